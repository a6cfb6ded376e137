"""When a decoder runs what its rows share once: only where the positions saved pay for the separate pass."""

from __future__ import annotations

import pytest
import torch
from test_virtual_tokens_once import _frozen, _model

from softprompt_cli.model.computed_once import COMPUTED_ONCE_MIN_POSITIONS, computing_once_pays, is_prefix


def test_computing_once_pays_on_a_cpu_from_enough_positions_saved():
    cpu = torch.device("cpu")
    assert computing_once_pays(cpu, 17, COMPUTED_ONCE_MIN_POSITIONS // 16)  # 16 other rows save 96 positions
    assert not computing_once_pays(cpu, 16, 2)  # a 2-token template start in 16 rows: 30 positions
    assert not computing_once_pays(cpu, 1, 500)  # a row alone saves nothing
    assert computing_once_pays(cpu, 4, 10, also_saved=66)  # packed rows behind the pass: 30 + 66 positions
    assert not computing_once_pays(cpu, 4, 10, also_saved=65)
    # a GPU step of a small model is bound by launching kernels: the extra pass costs more than it saves
    assert not computing_once_pays(torch.device("cuda"), 64, 50)


def _passes_and_loss(model, rows: int, lengths: list[int] | None = None) -> tuple[int, float]:
    """How many passes through the model one training forward makes, and its loss: `rows` rows of 6 tokens, or
    left-padded rows of `lengths` tokens (at least 2 each)."""
    lengths = lengths or [6] * rows
    ids = torch.arange(rows * max(lengths)).reshape(rows, -1) % 90 + 5
    mask = (torch.arange(max(lengths)) >= max(lengths) - torch.tensor(lengths)[:, None]).long()
    labels = ids.clone()
    labels[:, :-2] = -100  # the last two tokens, each predicted by a real one
    calls = []
    handle = model.base.base_model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        loss = model(input_ids=ids * mask, attention_mask=mask, labels=labels)["loss"]
    finally:
        handle.remove()
    return len(calls), loss.item()


def test_a_small_batch_keeps_its_virtual_tokens_a_large_one_runs_them_once(tiny_models):
    """Training batches: the virtual tokens run apart only where that saves enough positions; a loaded prompt for
    inference is always the prefix."""
    base, tokenizer = _frozen(tiny_models["llama"], "causal_lm", "model")
    model = _model(base, tokenizer, "prompt_tuning", {"num_virtual_tokens": 8}, "causal_lm", "model")
    assert model.virtual_tokens_as_prefix and model.kind == "prefix"
    assert is_prefix(model.task_prompt(model.task_names[0]))
    small, small_loss = _passes_and_loss(model, 4)  # 3 x 8 = 24 positions saved: not worth a pass
    large, large_loss = _passes_and_loss(model, 32)  # 31 x 8 = 248
    assert (small, large) == (1, 2)
    model.virtual_tokens_as_prefix = False  # the oracle: the prompt in every row
    assert _passes_and_loss(model, 32) == (1, pytest.approx(large_loss, rel=1e-5))
    assert _passes_and_loss(model, 4) == (1, pytest.approx(small_loss, rel=1e-5))


def test_a_small_batch_runs_its_virtual_tokens_once_where_its_rows_then_pack(tiny_models, monkeypatch):
    """4 rows save 3 x 8 = 24 positions by running the virtual tokens apart, not enough alone; but rows behind a
    prefix pack, and packing these (one of 40 tokens, three of 3) leaves out 111 of 160 padded positions."""
    from softprompt_cli.model import packing

    base, tokenizer = _frozen(tiny_models["llama"], "causal_lm", "model")
    model = _model(base, tokenizer, "prompt_tuning", {"num_virtual_tokens": 8}, "causal_lm", "model")
    packed = []
    monkeypatch.setattr(packing, "pack", lambda *args, pack=packing.pack: packed.append(pack(*args)) or packed[-1])
    passes, loss = _passes_and_loss(model, 4, [40, 3, 3, 3])
    assert (passes, len(packed)) == (2, 1)
    model.pack_rows = False  # the oracle: padded rows, each with the virtual tokens in it
    assert _passes_and_loss(model, 4, [40, 3, 3, 3]) == (1, pytest.approx(loss, rel=1e-5))
    assert len(packed) == 1
