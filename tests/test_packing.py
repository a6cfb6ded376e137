"""Decoders run the rows of a batch packed, without padding, behind the prefix they all share.

The oracle is the same model with packing off (`pack_rows`), every row padded to the longest: the loss, logits,
label-word scores and every trainable parameter's gradient must be the same, for left-padded (causal LM) and
right-padded (classification) rows, for each method, under gradient checkpointing.
"""

from __future__ import annotations

import pytest
import torch
from test_virtual_tokens_once import (
    _frozen,
    _model,
    assert_label_word_scores_same_either_way,
    assert_same_either_way,
    multitask_model,
)

from softprompt_cli.model import computed_once, packing
from softprompt_cli.model.soft_prompt import SoftPromptModel

TEXTS = ["fine", "a long and winding mess of scenes that never ends", "good fun", "bad"]
SHARED_START = [f"review : {text}" for text in TEXTS]
"""After a template's start that every row has alike ([CLS] "review :")."""
METHODS = [
    ("prompt_tuning", {"num_virtual_tokens": 5}),
    ("p_tuning", {"num_virtual_tokens": 4, "encoder": "mlp", "encoder_hidden_size": 16}),
    ("prefix_tuning", {"num_virtual_tokens": 3, "init": "random"}),
]
pytestmark = pytest.mark.usefixtures("computed_once_at_any_size")


@pytest.fixture
def packed_rows_small(monkeypatch):
    """Packed rows of about 8 tokens: a batch of a few short rows packs into more than one."""
    monkeypatch.setattr(packing, "PACKED_ROW_TOKENS", 8)


def _batch(tokenizer, side: str, texts: list[str] = TEXTS) -> dict[str, torch.Tensor]:
    tokenizer.padding_side = side
    inputs = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    if side == "left":
        labels[:, :-2] = -100  # loss on the last two tokens (each predicted by a real one), as on label words
    return {**inputs, "labels": labels}


def _packing(model: SoftPromptModel, on: bool) -> None:
    model.pack_rows = on


def _packed_calls(monkeypatch) -> list[packing.Packing]:
    calls = []
    pack = packing.pack

    def recording(*args, **kwargs):
        calls.append(pack(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(packing, "pack", recording)
    return calls


def test_packing_saves_positions_where_it_leaves_out_a_fifth():
    def mask(*lengths):
        return (torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]).long()

    assert packing.positions_saved(mask(10, 1, 2, 1)) == 40 - 14  # one packed row of 14 tokens
    assert packing.positions_saved(mask(3, 3, 2)) == 0  # 1 of 9 positions
    assert packing.positions_saved(mask(10)) == 0  # a row alone
    assert packing.positions_saved(mask(10, 1, 2, 1).to("meta")) == 0  # not measured off a CPU


def test_rows_go_longest_first_into_the_shortest_packed_row():
    assert packing.balanced([3, 7, 2, 5, 1], count=2) == [1, 0, 0, 1, 1]  # 7 + 2 and 5 + 3 + 1


def test_packing_keeps_each_tokens_id_and_position():
    """Left-padded rows, positions from 3 (a prefix of 3): every real token once, at its unpadded position, seeing
    its own row's earlier tokens only; the read columns (the last two) at the end of their packed rows."""
    ids = torch.tensor([[0, 0, 11, 12], [21, 22, 23, 24], [0, 0, 0, 31]])
    mask = (ids > 0).long()
    packed = packing.pack(ids, mask, first_position=3, read_tail=2)
    assert sorted(packed.input_ids[packed.input_ids > 0].tolist()) == sorted(ids[ids > 0].tolist())
    for token in ids[ids > 0].tolist():
        row, column = (ids == token).nonzero()[0].tolist()
        at = (packed.input_ids == token).nonzero()[0].tolist()
        assert packed.position_ids[at[0], at[1]] == 3 + column - int((mask[row] == 0).sum())
        seen = packed.input_ids[at[0]][packed.attention_mask[at[0], 0, at[1]]]
        assert sorted(seen.tolist()) == [t for t in ids[row].tolist() if 0 < t <= token]
    states = packed.input_ids[..., None].float()[:, -packed.read:]  # a token's "state": its id
    read = packing.unpack(states, packed)[..., 0]
    assert read.tolist() == [[11, 12], [23, 24], [0, 31]]


@pytest.mark.usefixtures("packed_rows_small")
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("method,values", METHODS, ids=[m for m, _ in METHODS])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_causal_lm_loss_and_gradients_equal_padded_rows(tiny_models, monkeypatch, kind, method, values,
                                                        checkpointing):
    """Tiny Llama (grouped-query attention, the last layer finishing only the columns read) and GPT-2 (learned
    positions). The rows' shared [CLS] runs once, with the prefix; the rest of them (10, 1, 2 and 1 tokens, the
    last token left out) pack into two rows: 10 tokens, and 2 + 1 + 1."""
    base, tokenizer = _frozen(tiny_models[kind], "causal_lm", "model", checkpointing)
    model = _model(base, tokenizer, method, values, "causal_lm", "model")
    assert model.pack_rows
    calls = _packed_calls(monkeypatch)
    assert_same_either_way(model, _batch(tokenizer, "left"), _packing)
    assert len(calls) == 1 and len(calls[0].input_ids) == 2


def test_a_batch_of_one_tasks_rows_in_a_multi_task_model(tiny_models, monkeypatch):
    """Multitask prompt tuning: rows of one task share that task's prompt, so they run packed behind it."""
    base, tokenizer = _frozen(tiny_models["llama"], "causal_lm", "model")
    model = multitask_model(base, tokenizer)
    calls = _packed_calls(monkeypatch)
    assert_same_either_way(model, {**_batch(tokenizer, "left"), "task_ids": torch.tensor([1, 1, 1, 1])}, _packing)
    assert len(calls) == 1


@pytest.mark.usefixtures("packed_rows_small")
def test_rows_of_several_tasks_pack_each_behind_its_tasks_prompt(tiny_models, monkeypatch):
    """Rows of two tasks: no packed row mixes them, and each packed row has its task's prompt; the loss,
    gradients (of both tasks' prompts) and label-word scores are the padded rows'."""
    base, tokenizer = _frozen(tiny_models["llama"], "causal_lm", "model")
    model = multitask_model(base, tokenizer)
    calls = _packed_calls(monkeypatch)
    task_ids = torch.tensor([1, 0, 1, 0])
    assert_same_either_way(model, {**_batch(tokenizer, "left"), "task_ids": task_ids}, _packing)
    assert len(calls) == 1
    packed_row = calls[0].source[:, -1] // calls[0].read  # where each row's last (read) column went
    for packed, representative in enumerate(calls[0].representative.tolist()):
        assert set(task_ids[packed_row == packed].tolist()) == {int(task_ids[representative])}
    scores = [model.eval().scores(**{k: v for k, v in _batch(tokenizer, "left").items() if k != "labels"},
                                  task_ids=task_ids) for model.pack_rows in (True, False)]
    torch.testing.assert_close(scores[0], scores[1], atol=1e-5, rtol=1e-5)
    assert len(calls) == 2  # scores: each task's rows apart; task 0's ("a long ...", "bad") pack


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_label_word_scores_equal_padded_rows(tiny_models, monkeypatch, kind):
    """Evaluation and predict: one-token words (one pass) and multi-token words (appended to the rows, the words
    padded on the right inside left-padded rows)."""
    base, tokenizer = _frozen(tiny_models[kind], "causal_lm", "model")
    model = _model(base, tokenizer, "prefix_tuning", {"num_virtual_tokens": 3, "init": "random"}, "causal_lm",
                   "model").eval()
    calls = _packed_calls(monkeypatch)
    assert_label_word_scores_same_either_way(model, _batch(tokenizer, "left"), "pack_rows")
    assert len(calls) == 2


@pytest.mark.parametrize("pooling", ["model", "mean"])
def test_decoder_classification_with_right_padding(tiny_models, monkeypatch, pooling):
    """A decoder with a classification head: right padding, the last real token or the mean of all."""
    base, tokenizer = _frozen(tiny_models["llama"], "sequence_classification", pooling)
    model = _model(base, tokenizer, "prompt_tuning", {"num_virtual_tokens": 3}, "sequence_classification", pooling)
    if pooling == "mean":
        model.head_dropout.p = 0.0
    calls = _packed_calls(monkeypatch)
    assert_same_either_way(model, {**_batch(tokenizer, "right"), "labels": torch.tensor([0, 1, 1, 0])}, _packing)
    assert calls


def test_sliding_window_the_rows_could_outgrow_keeps_them_padded(tiny_models, monkeypatch):
    """Gemma 3's window (12 tokens in the tiny model) could hide the prefix from a long row's last tokens: packed,
    the mask would have to say so, so such rows run padded; short rows run packed, with the same scores."""
    base, tokenizer = _frozen(tiny_models["gemma3"], "causal_lm", "model")
    model = _model(base, tokenizer, "prefix_tuning", {"num_virtual_tokens": 3, "init": "random"}, "causal_lm",
                   "model").eval()
    calls = _packed_calls(monkeypatch)
    model.scores(**{k: v for k, v in _batch(tokenizer, "left").items() if k != "labels"})
    assert not calls
    tokenizer.padding_side = "left"
    short = tokenizer(["fine", "good fun to watch", "bad"], padding=True, return_tensors="pt")
    assert_label_word_scores_same_either_way(model, {**short}, "pack_rows")
    assert calls


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_shared_leading_tokens_run_once_in_each_packed_row(tiny_models, monkeypatch, kind):
    """Prefix tuning, where a pass of their own would not pay for the leading tokens all rows share: they run first
    in each of the two packed rows (of about 16 tokens), and the rows' own tokens attend to them there."""
    monkeypatch.setattr(computed_once, "COMPUTED_ONCE_MIN_POSITIONS", 10**6)
    monkeypatch.setattr(packing, "PACKED_ROW_TOKENS", 16)
    base, tokenizer = _frozen(tiny_models[kind], "causal_lm", "model")
    model = _model(base, tokenizer, "prefix_tuning", {"num_virtual_tokens": 3, "init": "random"}, "causal_lm",
                   "model")
    calls = _packed_calls(monkeypatch)
    batch = _batch(tokenizer, "left", SHARED_START)
    assert_same_either_way(model, batch, _packing)
    assert len(calls) == 1 and len(calls[0].input_ids) == 2
    # [CLS] "review"; ":" is in a column the shortest row reads ("review : bad", its last column left out)
    shared = batch["input_ids"][0, -int(batch["attention_mask"][0].sum()):][:2]
    assert (calls[0].input_ids[:, :2] == shared).all() and (calls[0].input_ids[:, 2] != shared[0]).all()
    assert_label_word_scores_same_either_way(model.eval(), batch, "pack_rows")


def test_packed_rows_run_shared_tokens_that_would_run_first_in_the_pass(tiny_models, monkeypatch):
    """16 rows sharing 9 leading tokens (135 positions) pay for running them once, first in the rows' pass; their
    rows pack into one, which runs them once in its packed row instead."""
    monkeypatch.setattr(computed_once, "COMPUTED_ONCE_MIN_POSITIONS", 96)
    base, tokenizer = _frozen(tiny_models["llama"], "causal_lm", "model")
    model = _model(base, tokenizer, "prefix_tuning", {"num_virtual_tokens": 3, "init": "random"}, "causal_lm",
                   "model")
    calls, shared = _packed_calls(monkeypatch), []
    model.base.base_model.register_forward_pre_hook(
        lambda module, args, kwargs: shared.append(kwargs.get("softprompt_shared", 0)), with_kwargs=True)
    batch = _batch(tokenizer, "left", [f"the review of the film , in short : {text}" for text in TEXTS * 4])
    assert_same_either_way(model, batch, _packing)
    # packed: in its packed row; padded: [CLS] and the 9 words once, first in the rows' pass
    assert (shared, len(calls)) == ([0, 10], 1)
    assert (calls[0].input_ids[0, :9] == batch["input_ids"][0, -int(batch["attention_mask"][0].sum()):][:9]).all()


def test_shared_leading_tokens_in_packed_rows_inside_a_sliding_window(tiny_models, monkeypatch):
    """Gemma 3 (a 12-token window): rows short enough to pack share their leading tokens there too."""
    monkeypatch.setattr(computed_once, "COMPUTED_ONCE_MIN_POSITIONS", 10**6)
    base, tokenizer = _frozen(tiny_models["gemma3"], "causal_lm", "model")
    model = _model(base, tokenizer, "prefix_tuning", {"num_virtual_tokens": 3, "init": "random"}, "causal_lm",
                   "model").eval()
    calls = _packed_calls(monkeypatch)
    tokenizer.padding_side = "left"
    rows = tokenizer(["review : good fun to see", "review :", "review :"], padding=True, return_tensors="pt")
    assert_label_word_scores_same_either_way(model, {**rows}, "pack_rows")
    assert calls and (calls[0].input_ids[:, :2] == rows["input_ids"][-1, -4:-2]).all()  # [CLS] "review"


@pytest.mark.parametrize("pooling", ["model", "mean"])
def test_shared_leading_tokens_in_packed_rows_with_right_padding(tiny_models, monkeypatch, pooling):
    """Every column read (mean pooling): the shared tokens' states from the row's own packed row (of two)."""
    monkeypatch.setattr(computed_once, "COMPUTED_ONCE_MIN_POSITIONS", 10**6)
    monkeypatch.setattr(packing, "PACKED_ROW_TOKENS", 16)
    base, tokenizer = _frozen(tiny_models["llama"], "sequence_classification", pooling)
    model = _model(base, tokenizer, "prefix_tuning", {"num_virtual_tokens": 3, "init": "random"},
                   "sequence_classification", pooling)
    if pooling == "mean":
        model.head_dropout.p = 0.0
    calls = _packed_calls(monkeypatch)
    batch = {**_batch(tokenizer, "right", SHARED_START), "labels": torch.tensor([0, 1, 1, 0])}
    assert_same_either_way(model, batch, _packing)
    assert len(calls[0].input_ids) == 2 and (calls[0].input_ids[:, :3] == batch["input_ids"][0, :3]).all()


def test_rows_with_little_padding_run_padded(tiny_models, monkeypatch):
    base, tokenizer = _frozen(tiny_models["llama"], "causal_lm", "model")
    model = _model(base, tokenizer, "prefix_tuning", {"num_virtual_tokens": 3, "init": "random"}, "causal_lm",
                   "model")
    calls = _packed_calls(monkeypatch)
    tokenizer.padding_side = "left"
    alike = dict(tokenizer(["good fun", "bad fun", "a mess"], padding=True, return_tensors="pt"))
    model(**alike, labels=alike["input_ids"])
    assert not calls

