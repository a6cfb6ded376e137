"""Shared fixtures: a private HF cache, offline mode, and tiny random BERT / GPT-2 / Llama models."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
GLUE_DIR = SHARED_DATA / "glue"

# Run as `python -c NO_HEAVY_IMPORTS ARGS...`: the CLI with ARGS, then a check that torch/transformers stayed out.
NO_HEAVY_IMPORTS = """
import sys
from softprompt_cli.cli import main
sys.argv = ["softprompt", *sys.argv[1:]]
try:
    main()
    code = 0
except SystemExit as exit_:
    code = exit_.code
heavy = [name for name in ("torch", "transformers") if name in sys.modules]
assert not heavy, f"imported {heavy}"
print("exit", code)
"""


@pytest.fixture(autouse=True, scope="session")
def _private_hf_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf_home")
    os.environ["HF_HOME"] = str(cache)
    os.environ["HF_DATASETS_CACHE"] = str(cache / "datasets")
    os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network
    os.environ.pop("GLUE_DIR", None)


def _tokenizer():
    from transformers import AutoTokenizer

    from softprompt_cli.hub import packaged_model_path

    return AutoTokenizer.from_pretrained(packaged_model_path("sentence-transformers/all-MiniLM-L6-v2"))


def _save_tiny(kind: str, folder: Path) -> Path:
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, BertConfig, GPT2Config, LlamaConfig

    tokenizer = _tokenizer()
    vocab = tokenizer.vocab_size
    configs = {
        "bert": BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=37, max_position_embeddings=160),
        "gpt2": GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=160,
                           bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id),
        "llama": LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=160,
                             bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id),
    }
    torch.manual_seed(0)
    # Decoders are saved with their LM head (causal_lm loads it; AutoModel drops it).
    model = (AutoModel if kind == "bert" else AutoModelForCausalLM).from_config(configs[kind])
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {kind: _save_tiny(kind, root / kind) for kind in ("bert", "gpt2", "llama")}


def cli_exit_code(*args) -> int:
    """The CLI in-process, for module-scoped fixtures (which have no capsys): its exit code."""
    from softprompt_cli.cli import main

    saved, sys.argv = sys.argv, ["softprompt", *map(str, args)]
    try:
        main()
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = saved
    return 0


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """Run the CLI in-process; return (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        from softprompt_cli.cli import main

        monkeypatch.setattr(sys, "argv", ["softprompt", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def write_recipe(tmp_path: Path, model: str, method: dict, **sections) -> Path:
    recipe = {
        "model": {"name_or_path": model},
        "data": {"glue_task": "mrpc", "dir": str(GLUE_DIR), "max_train_samples": 48, "max_eval_samples": 40},
        "method": {"num_virtual_tokens": 4, **method},
        "training": {"batch_size": 8, "eval_batch_size": 16, "epochs": 2, "lr": 1e-2, "log_steps": 2},
        "output": {"dir": str(tmp_path / "run")},
    }
    for name, values in sections.items():
        recipe.setdefault(name, {}).update(values)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path
