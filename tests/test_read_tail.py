"""A decoder's last layer finishes only the last columns when only their states are read.

The oracle is the same model with the shortcut off (`read_tail_only`), the last layer computing every position:
the loss, logits and every trainable gradient (training), the label-word scores and greedy generations must be the
same, for each layer layout (Llama's, Mistral's, Qwen2's, Qwen3's; Gemma 3's norms around both halves), each
method, targets of different lengths, gradient checkpointing, and leading tokens that all rows share.
"""

from __future__ import annotations

import pytest
import torch
from conftest import save_random_model
from test_virtual_tokens_once import _frozen, _model, assert_label_word_scores_same_either_way, assert_same_either_way

from softprompt_cli.model.read_tail import LAYOUTS, last_decoder_layer, read_tail_enabled
from softprompt_cli.model.soft_prompt import SoftPromptModel

TEXTS = ["review : the film was fine . sentiment :", "review : the film was a long and winding mess of scenes",
         "review : the film was good fun"]
METHODS = [
    ("prompt_tuning", {"num_virtual_tokens": 5}),
    ("p_tuning", {"num_virtual_tokens": 4, "encoder": "mlp", "encoder_hidden_size": 16}),
    ("prefix_tuning", {"num_virtual_tokens": 3, "init": "random"}),
]
KINDS = ["llama", "mistral", "qwen2", "qwen3", "gemma3"]


@pytest.fixture(scope="module")
def decoders(tiny_models, tmp_path_factory) -> dict[str, object]:
    """Tiny random decoders of every layout: the shared Llama and Gemma 3, and Mistral, Qwen2, Qwen3."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig, Qwen2Config, Qwen3Config

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    shape = dict(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=160, head_dim=8,
                 bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    folders = {kind: tiny_models[kind] for kind in ("llama", "gemma3", "gpt2")}
    for kind, config in (("mistral", MistralConfig(**shape)), ("qwen2", Qwen2Config(**shape)),
                         ("qwen3", Qwen3Config(**shape))):
        folders[kind] = save_random_model(tmp_path_factory.mktemp(kind), AutoModelForCausalLM, config, tokenizer)
    return folders


def _batch(tokenizer, target_lengths: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Left-padded rows whose loss falls on their last `target_lengths` tokens (different spans, as generation
    targets have)."""
    tokenizer.padding_side = "left"
    inputs = dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))
    labels = torch.full_like(inputs["input_ids"], -100)
    for row, length in enumerate(target_lengths):
        labels[row, -length:] = inputs["input_ids"][row, -length:]
    return {**inputs, "labels": labels}


def _read_tail_only(model: SoftPromptModel, on: bool) -> None:
    model.read_tail_only = on


def _feed_forward_columns(model: SoftPromptModel, run) -> list[int]:
    """How many columns the last layer's feed-forward half computed during `run()`."""
    seen = []
    feed_forward = last_decoder_layer(model.base).mlp
    handle = feed_forward.register_forward_hook(lambda _module, args, _output: seen.append(args[0].shape[1]))
    try:
        run()
    finally:
        handle.remove()
    return seen


def test_every_layout_is_a_packaged_or_tested_decoder():
    assert set(LAYOUTS) == {"llama", "mistral", "qwen2", "qwen3", "gemma3_text"}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("method,values", METHODS, ids=[m for m, _ in METHODS])
@pytest.mark.parametrize("kind", KINDS)
def test_training_loss_and_gradients_equal_the_full_last_layer(decoders, kind, method, values, checkpointing):
    base, tokenizer = _frozen(decoders[kind], "causal_lm", "model", checkpointing)
    model = _model(base, tokenizer, method, values, "causal_lm", "model")
    assert read_tail_enabled(base) and model.read_tail_only
    batch = _batch(tokenizer, (1, 3, 2))
    assert not batch["attention_mask"].all()
    assert_same_either_way(model, batch, _read_tail_only)


def test_the_last_layer_finishes_only_the_columns_read(decoders):
    """Targets on the last 1, 3 and 2 tokens: the loss reads 3 input columns (the token before each target), and
    the last layer's feed-forward half computes those alone."""
    base, tokenizer = _frozen(decoders["llama"], "causal_lm", "model")
    model = _model(base, tokenizer, "prefix_tuning", {"num_virtual_tokens": 3, "init": "random"}, "causal_lm",
                   "model")
    batch = _batch(tokenizer, (1, 3, 2))
    model.share_leading_tokens = False
    model.pack_rows = False  # the padded batch's columns (packed rows: tests/test_packing.py)
    assert _feed_forward_columns(model, lambda: model(**batch)) == [3]
    model.read_tail_only = False
    assert _feed_forward_columns(model, lambda: model(**batch)) == [batch["input_ids"].shape[1] - 1]


@pytest.mark.usefixtures("computed_once_at_any_size")
@pytest.mark.parametrize("targets", [(1, 3, 2), (1, 9, 2)], ids=["rows-own-columns", "into-shared-columns"])
@pytest.mark.parametrize("method,values", METHODS[::2], ids=[m for m, _ in METHODS[::2]])
def test_with_leading_tokens_run_once(decoders, method, values, targets):
    """Rows that start alike run their shared start once: the columns read are the rows' own (their pass finishes
    only those), or reach back past the shortest row's own tokens (the shared states go back first)."""
    base, tokenizer = _frozen(decoders["llama"], "causal_lm", "model")
    model = _model(base, tokenizer, method, values, "causal_lm", "model")
    batch = _batch(tokenizer, targets)
    assert model.share_leading_tokens
    assert_same_either_way(model, batch, _read_tail_only)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_label_word_scores_and_generation_equal_the_full_last_layer(decoders, kind):
    """Evaluation and predict: one-token words (the last column), multi-token words (the appended words' columns),
    and greedy generation, whose first token comes from the last column of the prefill."""
    base, tokenizer = _frozen(decoders[kind], "causal_lm", "model")
    model = _model(base, tokenizer, "prompt_tuning", {"num_virtual_tokens": 3}, "causal_lm", "model").eval()
    batch = _batch(tokenizer, (1, 1, 1))
    assert_label_word_scores_same_either_way(model, batch, "read_tail_only")
    generated = []
    for on in (True, False):
        model.read_tail_only = on
        generated.append(model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=4,
                                        stop_ids=[tokenizer.sep_token_id]))
    assert torch.equal(generated[0], generated[1])


def test_other_decoders_run_unchanged(decoders):
    """GPT-2's block is not one of the layouts: it keeps its own forward, and the loss still reads the columns that
    predict the targets (the oracle: every column's states, then those columns picked)."""
    base, tokenizer = _frozen(decoders["gpt2"], "causal_lm", "model")
    model = _model(base, tokenizer, "prompt_tuning", {"num_virtual_tokens": 3}, "causal_lm", "model")
    assert last_decoder_layer(base) is None and not model.read_tail_only
    batch = _batch(tokenizer, (1, 3, 2))
    columns = batch["input_ids"].shape[1] - 1
    every_column = model.encode(batch["input_ids"][:, :columns], batch["attention_mask"][:, :columns], None,
                                model.prompt_for(None, 3)).states[:, -columns:]
    picked = every_column[batch["labels"][:, 1:] != -100]
    torch.testing.assert_close(model(**batch)["logits"], model.lm_head(picked).float(), atol=1e-5, rtol=1e-5)
