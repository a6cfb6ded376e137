"""init-prefix-from-text: a prefix made from text T makes a decoder see T."""

from __future__ import annotations

import pytest
import torch
from conftest import write_recipe
from safetensors.torch import load_file

from softprompt_cli.model.loading import Geometry, load_base_model, load_tokenizer
from softprompt_cli.model.prefix_capture import prefix_from_ids

TEXT = "the quick brown fox jumps over the lazy dog near the river bank"


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_prefix_from_text_equals_the_text_in_context(tiny_models, kind):
    """Hidden states (hence logits) for X with the prefix made from T equal those for T+X at X's positions."""
    base = load_base_model(str(tiny_models[kind]), revision=None, dtype="float32", trust_remote_code=False,
                           pooling="mean", label_names=[]).eval()
    tokenizer = load_tokenizer(str(tiny_models[kind]))
    text_ids = tokenizer(TEXT)["input_ids"]
    n = 7
    flat = prefix_from_ids(base, text_ids, n)
    size = Geometry.of(base.config)
    prefix = flat.view(n, size.num_layers, 2, size.num_kv_heads, size.head_dim).permute(1, 2, 3, 0, 4)[:, :, None]
    x_ids = tokenizer("and then it rests", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        with_prefix = base(input_ids=torch.tensor([x_ids]), position_ids=torch.arange(len(x_ids))[None] + n,
                           softprompt_prefix=prefix).last_hidden_state
        in_context = base(input_ids=torch.tensor([text_ids[:n] + x_ids])).last_hidden_state[:, n:]
    torch.testing.assert_close(with_prefix, in_context, atol=1e-5, rtol=1e-5)


def test_cli_writes_a_prefix_that_training_starts_from(tmp_path, tiny_models, run_cli):
    model = str(tiny_models["llama"])
    code, out, err = run_cli("init-prefix-from-text", "--model", model, "--text", TEXT, "--num-virtual-tokens", "6",
                             "-o", tmp_path / "prefix")
    assert code == 0, out + err
    assert "6-token prefix" in out
    prefix = load_file(tmp_path / "prefix" / "softprompt.safetensors")["prompt.tokens.embedding"]
    assert prefix.shape == (6, 2 * 2 * 2 * 8)  # layers * (key, value) * kv_heads * head_dim

    from softprompt_cli.assemble import load_trained

    recipe = write_recipe(tmp_path, model, {"name": "prefix_tuning", "num_virtual_tokens": 6,
                                            "init": "from_checkpoint", "init_checkpoint": str(tmp_path / "prefix")},
                          training={"max_steps": 1, "lr": 1e-9}, task={"pooling": "mean"})
    assert run_cli("train", recipe)[0] == 0
    _, trained, _, _ = load_trained(tmp_path / "run" / "final")
    torch.testing.assert_close(trained.prompt.tokens.embedding.detach(), prefix, atol=1e-5, rtol=0)

    recipe = write_recipe(tmp_path, model, {"name": "prefix_tuning", "num_virtual_tokens": 6, "init": "text",
                                            "init_text": TEXT}, training={"max_steps": 1, "lr": 1e-9},
                          task={"pooling": "mean"}, output={"overwrite": True})
    assert run_cli("train", recipe)[0] == 0
    _, trained, _, _ = load_trained(tmp_path / "run" / "final")
    torch.testing.assert_close(trained.prompt.tokens.embedding.detach(), prefix, atol=1e-5, rtol=0)


def test_cli_bad_input(tmp_path, tiny_models, run_cli):
    model = str(tiny_models["gpt2"])
    code, out, err = run_cli("init-prefix-from-text", "--model", model, "--text", "two words",
                             "--num-virtual-tokens", "20", "-o", tmp_path / "p")
    assert code == 2 and "has 4 tokens" in err and "Traceback" not in out + err  # [CLS] two words [SEP]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    code, out, err = run_cli("init-prefix-from-text", "--model", model, "--text", TEXT, "--num-virtual-tokens", "3",
                             "-o", tmp_path / "full")
    assert code == 2 and "--overwrite" in err and (tmp_path / "full" / "keep.txt").read_text() == "mine"
    code, out, err = run_cli("init-prefix-from-text", "--model", model, "--text", TEXT, "--num-virtual-tokens", "3",
                             "-o", tmp_path / "p", "--chat-template")
    assert code == 2 and "no chat template" in err
    code, out, err = run_cli("init-prefix-from-text", "--model", str(tmp_path / "nowhere"), "--text", TEXT,
                             "--num-virtual-tokens", "3", "-o", tmp_path / "p")
    assert code == 2 and "does not exist" in err and "Traceback" not in out + err
    no_tokenizer = tmp_path / "bare"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((tiny_models["gpt2"] / name).read_bytes())
    code, out, err = run_cli("init-prefix-from-text", "--model", no_tokenizer, "--text", TEXT,
                             "--num-virtual-tokens", "3", "-o", tmp_path / "p")
    assert code == 2 and "has no tokenizer" in err and "Traceback" not in out + err
