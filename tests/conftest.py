"""Shared fixtures: a private HF cache, offline mode, and tiny random BERT / GPT-2 / Llama models."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
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
    from transformers import AutoModel, AutoModelForCausalLM, BertConfig, Gemma3TextConfig, GPT2Config, LlamaConfig

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
        # scaled input embeddings (x sqrt(hidden) in the embedding module), a sliding-window layer, GQA
        "gemma3": Gemma3TextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                                   max_position_embeddings=160, sliding_window=12,
                                   layer_types=["sliding_attention", "full_attention"],
                                   bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                                   pad_token_id=tokenizer.pad_token_id),
    }
    # Decoders are saved with their LM head (causal_lm loads it; AutoModel drops it).
    return save_random_model(folder, AutoModel if kind == "bert" else AutoModelForCausalLM, configs[kind], tokenizer)


def save_random_model(folder: Path, auto_class, config, tokenizer) -> Path:
    """A model of `config` with weights drawn from seed 0, saved with `tokenizer` into `folder`."""
    import torch

    torch.manual_seed(0)
    auto_class.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {kind: _save_tiny(kind, root / kind) for kind in ("bert", "gpt2", "llama", "gemma3")}


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


def interrupt_at_optimizer_step(monkeypatch, stop_at: int) -> None:
    """Send ourselves SIGINT right after the `stop_at`-th optimizer step, as a user's Ctrl-C would."""
    import torch

    original = torch.optim.AdamW.step
    calls = {"n": 0}

    def step(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == stop_at:
            signal.raise_signal(signal.SIGINT)
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step)


def logged_without_timings(run: Path) -> list[dict]:
    """A run's metrics log without its timings (what two equal runs share)."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("elapsed_s", "examples_per_s")} for r in lines]


def train_in_two_processes(recipe: Path) -> subprocess.CompletedProcess:
    """`softprompt train` in two gloo processes (what `accelerate launch --multi_gpu` really starts on CPU), on a
    free port so that parallel runs do not collide on 29500; it must succeed within 5 minutes."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(port), "-m", "softprompt_cli", "train", str(recipe)]
    try:
        done = subprocess.run(launch, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as timeout:
        raise AssertionError(f"the 2-process run hung: {str(timeout.stdout)[-2000:]} {str(timeout.stderr)[-2000:]}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 process(es)" in done.stdout
    return done


# --------------------------------------------------------------------------------------------- served checkpoints

SST2_LM_TASK = {"type": "causal_lm", "template": "Review: {sentence} Sentiment:",
                "label_words": {"negative": " bad", "positive": " good"}}
LM_METHODS = {"pt": {"name": "prompt_tuning"}, "prefix": {"name": "prefix_tuning"},
              "ptuning": {"name": "p_tuning", "encoder_hidden_size": 16}}


def _train(tmp_path: Path, model: Path, method: dict, **sections) -> Path:
    recipe = write_recipe(tmp_path, str(model), method, training={"epochs": 1, "lr": 3e-2}, **sections)
    assert cli_exit_code("train", recipe) == 0
    return tmp_path / "run" / "final"


@pytest.fixture(scope="session")
def lm_checkpoints(tmp_path_factory, tiny_models) -> dict[str, Path]:
    return {name: _train(tmp_path_factory.mktemp(name), tiny_models["llama"], method,
                         data={"glue_task": "sst2", "max_train_samples": 16, "max_eval_samples": 8},
                         task=SST2_LM_TASK)
            for name, method in LM_METHODS.items()}


@pytest.fixture(scope="session")
def classifiers(tmp_path_factory, tiny_models) -> dict[str, Path]:
    methods = {"mrpc_pt": {"name": "prompt_tuning"}, "mrpc_prefix": {"name": "prefix_tuning"}}
    trained = {name: _train(tmp_path_factory.mktemp(name), tiny_models["bert"], method)
               for name, method in methods.items()}
    trained["mrpc_start"] = _train(tmp_path_factory.mktemp("start"), tiny_models["bert"], {"name": "prompt_tuning"},
                                   task={"prompt_position": "start"})  # exportable to PEFT
    return trained


@pytest.fixture
def computed_once_at_any_size(monkeypatch):
    """Decoders run what rows share once however few rows and tokens (by default only where it saves enough
    positions to pay for running apart from the rows), so that tiny batches test that path."""
    from softprompt_cli.model import computed_once

    monkeypatch.setattr(computed_once, "COMPUTED_ONCE_MIN_POSITIONS", 0)
