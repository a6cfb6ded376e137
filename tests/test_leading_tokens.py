"""Decoders run the leading tokens every row of a batch shares (a template's start) once, as a prefix.

The oracle is the same model with `share_leading_tokens` off, every row running every token: the loss, logits,
label-word scores and every trainable parameter's gradient must be the same, for left-padded (causal LM) and
right-padded (classification) rows, for each method, under gradient checkpointing.
"""

from __future__ import annotations

import pytest
import torch
from test_virtual_tokens_once import _frozen, _model, assert_label_word_scores_same_either_way, assert_same_either_way

from softprompt_cli.model import computed_once as leading_tokens
from softprompt_cli.model.soft_prompt import SoftPromptModel

TEMPLATE = "review : the film was {} . sentiment :"
TEXTS = [TEMPLATE.format(words) for words in ("fine", "a long and winding mess of scenes", "good fun")]
pytestmark = pytest.mark.usefixtures("computed_once_at_any_size")
METHODS = [
    ("prompt_tuning", {"num_virtual_tokens": 5}),
    ("p_tuning", {"num_virtual_tokens": 4, "encoder": "mlp", "encoder_hidden_size": 16}),
    ("prefix_tuning", {"num_virtual_tokens": 3, "init": "random"}),
]


def _batch(tokenizer, side: str) -> dict[str, torch.Tensor]:
    tokenizer.padding_side = side
    inputs = dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))
    assert not inputs["attention_mask"].all()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    labels[:, :-2] = -100  # loss on the last tokens only, as on label words
    return {**inputs, "labels": labels}


def _leading_tokens_once(model: SoftPromptModel, on: bool) -> None:
    model.share_leading_tokens = on


def _shared_count(model: SoftPromptModel, batch: dict) -> int:
    model.share_leading_tokens = True
    plan = model._computed_once_plan(batch["input_ids"][:, :-1], batch["attention_mask"][:, :-1], None,
                                     model.prompt_for(None, len(batch["input_ids"])), None)
    return 0 if plan is None else plan[1]


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("method,values", METHODS, ids=[m for m, _ in METHODS])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_causal_lm_loss_and_gradients_equal_every_row_running_every_token(tiny_models, kind, method, values,
                                                                          checkpointing):
    """Tiny Llama (grouped-query attention) and GPT-2 (learned positions), left-padded rows that start alike."""
    base, tokenizer = _frozen(tiny_models[kind], "causal_lm", "model", checkpointing)
    model = _model(base, tokenizer, method, values, "causal_lm", "model")
    batch = _batch(tokenizer, "left")
    assert _shared_count(model, batch) >= 5  # "review : the film was"
    assert_same_either_way(model, batch, _leading_tokens_once)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_label_word_scores_equal_every_row_running_every_token(tiny_models, kind):
    """Evaluation and predict: one-token words (one pass) and multi-token words (appended to the rows)."""
    base, tokenizer = _frozen(tiny_models[kind], "causal_lm", "model")
    model = _model(base, tokenizer, "prefix_tuning", {"num_virtual_tokens": 3, "init": "random"}, "causal_lm",
                   "model").eval()
    assert_label_word_scores_same_either_way(model, _batch(tokenizer, "left"), "share_leading_tokens")


@pytest.mark.parametrize("pooling", ["model", "mean"])
def test_decoder_classification_with_right_padding(tiny_models, pooling):
    """A decoder with a classification head: right padding, the last real token or the mean of all."""
    base, tokenizer = _frozen(tiny_models["llama"], "sequence_classification", pooling)
    model = _model(base, tokenizer, "prompt_tuning", {"num_virtual_tokens": 3}, "sequence_classification", pooling)
    batch = {**_batch(tokenizer, "right"), "labels": torch.tensor([0, 1, 1])}
    if pooling == "mean":  # its draws would fall at different points of the two runs
        model.head_dropout.p = 0.0
    assert_same_either_way(model, batch, _leading_tokens_once)


def test_not_shared_under_a_sliding_window_the_rows_could_outgrow(tiny_models):
    base, tokenizer = _frozen(tiny_models["llama"], "causal_lm", "model")
    model = _model(base, tokenizer, "prefix_tuning", {"num_virtual_tokens": 3, "init": "random"}, "causal_lm",
                   "model")
    batch = _batch(tokenizer, "left")
    base.config.sliding_window = batch["input_ids"].shape[1]  # 3 prefix positions + the rows would outgrow it
    assert _shared_count(model, batch) == 0
    base.config.sliding_window = None
    assert _shared_count(model, batch) >= 5


def test_shared_leading_count_left_and_right_padding():
    ids = torch.tensor([[0, 0, 7, 8, 9, 4], [7, 8, 9, 5, 6, 2], [0, 7, 8, 3, 3, 3]])
    mask = (ids != 0).long()
    starts = leading_tokens.first_real_column(mask)
    assert starts.tolist() == [2, 0, 1]
    assert leading_tokens.shared_leading_count(ids, mask, starts) == 2  # 7 8
    right = torch.tensor([[7, 8, 0, 0], [7, 8, 9, 0]])
    right_mask = (right != 0).long()
    # every row keeps one token of its own: [7, 8] could share only 1
    assert leading_tokens.shared_leading_count(right, right_mask, leading_tokens.first_real_column(right_mask)) == 1
    assert leading_tokens.shared_leading_count(ids[:1], mask[:1], starts[:1]) == 0  # one row: nothing to share


def test_without_and_with_leading_put_every_column_back():
    ids = torch.tensor([[0, 0, 7, 8, 9, 4], [7, 8, 9, 5, 6, 2], [0, 7, 8, 3, 3, 1]])
    mask = (ids != 0).long()
    starts = leading_tokens.first_real_column(mask)
    narrow = leading_tokens.without_leading(ids, starts, 2)
    assert narrow.tolist() == [[0, 0, 9, 4], [9, 5, 6, 2], [0, 3, 3, 1]]
    assert leading_tokens.without_leading(mask, starts, 2).tolist() == [[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]]
    states = ids[..., None].float().expand(-1, -1, 3)
    leading = states[1:2, 0:2]
    back = leading_tokens.with_leading(leading_tokens.without_leading(states, starts, 2), leading, starts)
    torch.testing.assert_close(back, states)
