"""When a decoder runs what its rows share once: only where the positions saved pay for running them apart."""

from __future__ import annotations

import pytest
import torch
from test_virtual_tokens_once import _frozen, _model

from softprompt_cli.model.computed_once import (
    COMPUTED_ONCE_MIN_POSITIONS,
    computing_once_pays,
    is_prefix,
)


def test_computing_once_pays_on_a_cpu_from_enough_positions_saved():
    cpu = torch.device("cpu")
    assert computing_once_pays(cpu, 17, COMPUTED_ONCE_MIN_POSITIONS // 16)  # 16 other rows save enough positions
    assert not computing_once_pays(cpu, 2, COMPUTED_ONCE_MIN_POSITIONS - 1)
    assert not computing_once_pays(cpu, 1, 500)  # a row alone saves nothing
    assert computing_once_pays(cpu, 2, 10, also_saved=COMPUTED_ONCE_MIN_POSITIONS - 10)  # packed rows behind them
    assert not computing_once_pays(cpu, 2, 10, also_saved=COMPUTED_ONCE_MIN_POSITIONS - 11)
    assert computing_once_pays(cpu, 16, 2)  # a 2-token template start in 16 rows
    # a GPU step of a small model is bound by launching kernels: not measured to pay there
    assert not computing_once_pays(torch.device("cuda"), 64, 50)


def _shared_and_loss(model, rows: int, lengths: list[int] | None = None) -> tuple[int, float]:
    """How many positions one training forward runs once, first in the rows' pass (its one pass through the
    model), and its loss: `rows` rows of 6 tokens, or left-padded rows of `lengths` tokens (at least 2 each)."""
    lengths = lengths or [6] * rows
    ids = torch.arange(rows * max(lengths)).reshape(rows, -1) % 90 + 5
    mask = (torch.arange(max(lengths)) >= max(lengths) - torch.tensor(lengths)[:, None]).long()
    labels = ids.clone()
    labels[:, :-2] = -100  # the last two tokens, each predicted by a real one
    shared = []
    handle = model.base.base_model.register_forward_pre_hook(
        lambda module, args, kwargs: shared.append(kwargs.get("softprompt_shared", 0)), with_kwargs=True)
    try:
        loss = model(input_ids=ids * mask, attention_mask=mask, labels=labels)["loss"]
    finally:
        handle.remove()
    assert len(shared) == 1
    return shared[0], loss.item()


def test_a_small_batch_keeps_its_virtual_tokens_a_larger_one_runs_them_once(tiny_models):
    """Training batches: the virtual tokens run once, first in the rows' pass, only where that saves enough
    positions; a loaded prompt for inference is always the prefix."""
    base, tokenizer = _frozen(tiny_models["llama"], "causal_lm", "model")
    model = _model(base, tokenizer, "prompt_tuning", {"num_virtual_tokens": 8}, "causal_lm", "model")
    model.share_leading_tokens = False  # the virtual tokens alone
    assert model.virtual_tokens_as_prefix and model.kind == "prefix"
    assert is_prefix(model.task_prompt(model.task_names[0]))
    small, small_loss = _shared_and_loss(model, 2)  # 1 x 8 positions saved: not worth it
    large, large_loss = _shared_and_loss(model, 4)  # 3 x 8 = 24
    assert (small, large) == (0, 8)
    model.virtual_tokens_as_prefix = False  # the oracle: the prompt in every row
    assert _shared_and_loss(model, 4) == (0, pytest.approx(large_loss, rel=1e-5))
    assert _shared_and_loss(model, 2) == (0, pytest.approx(small_loss, rel=1e-5))


def test_a_small_batch_runs_its_virtual_tokens_once_where_its_rows_then_pack(tiny_models, monkeypatch):
    """2 rows save 8 positions by running the virtual tokens once, not enough alone; but rows behind a prefix
    pack, and packing these (of 40 tokens and 3) leaves out 37 of 80 padded positions."""
    from softprompt_cli.model import packing

    base, tokenizer = _frozen(tiny_models["llama"], "causal_lm", "model")
    model = _model(base, tokenizer, "prompt_tuning", {"num_virtual_tokens": 8}, "causal_lm", "model")
    packed = []
    monkeypatch.setattr(packing, "pack", lambda *args, pack=packing.pack: packed.append(pack(*args)) or packed[-1])
    shared, loss = _shared_and_loss(model, 2, [40, 3])
    assert (shared, len(packed)) == (8, 1)
    model.pack_rows = False  # the oracle: padded rows, each with the virtual tokens in it
    assert _shared_and_loss(model, 2, [40, 3]) == (0, pytest.approx(loss, rel=1e-5))
    assert len(packed) == 1


def test_a_decoder_that_takes_no_4d_mask_keeps_its_virtual_tokens_in_the_rows(tiny_models):
    """The shared positions run first in the rows' pass under softprompt's own 4D masks; a decoder outside
    `packing.PACKED_MODEL_TYPES` gets every row with its virtual tokens instead, and the same loss."""
    base, tokenizer = _frozen(tiny_models["llama"], "causal_lm", "model")
    model = _model(base, tokenizer, "prompt_tuning", {"num_virtual_tokens": 8}, "causal_lm", "model")
    shared, loss = _shared_and_loss(model, 8)
    model.runs_shared_first = False
    assert shared > 0 and _shared_and_loss(model, 8) == (0, pytest.approx(loss, rel=1e-5))


def test_rows_lengthened_past_a_sliding_window_keep_their_virtual_tokens(tiny_models, monkeypatch):
    """Gemma 3 (a 12-token window), 5 virtual tokens and max_length 7 fit; rows lengthened by a 4-token label word
    do not, so their virtual tokens stay in the rows, where the window hides them from the last tokens, as the
    model computes them there (label-word scores as with the prompt in every row)."""
    from softprompt_cli.methods.base import registry
    from softprompt_cli.model import computed_once, lm
    from softprompt_cli.model.soft_prompt import SoftPromptModel

    monkeypatch.setattr(computed_once, "COMPUTED_ONCE_MIN_POSITIONS", 0)
    base, tokenizer = _frozen(tiny_models["gemma3"], "causal_lm", "model")
    torch.manual_seed(3)
    options = registry()["prompt_tuning"](name="prompt_tuning", num_virtual_tokens=5)
    model = SoftPromptModel(base, options, tokenizer, "model", 2, max_length=7, task_type="causal_lm",
                            label_word_ids=[[5], [7]]).eval()
    assert model.virtual_tokens_as_prefix
    tokenizer.padding_side = "left"
    rows = tokenizer(["review : good fun", "review : bad fun", "review : x y"], padding=True, return_tensors="pt")
    scores = []
    for model.runs_shared_first in (True, False):
        scores.append(lm.label_word_scores(model, rows["input_ids"], rows["attention_mask"],
                                           model.prompt_for(None, 3), [[5, 6, 8, 9], [7]]))
    torch.testing.assert_close(scores[0], scores[1], atol=1e-5, rtol=1e-5)
