"""Decoders compute an input prompt's virtual tokens once and give them to every row as keys and values.

The oracle is the same model with the virtual tokens in every row's input (`virtual_tokens_as_prefix` off):
the logits, the loss and every trainable parameter's gradient must be the same, for rows of different lengths
(padding), under gradient checkpointing, for several tasks' prompts in one batch, and for generation.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from softprompt_cli.methods.base import registry
from softprompt_cli.model import packing
from softprompt_cli.model.computed_once import is_prefix
from softprompt_cli.model.loading import load_base_model, load_tokenizer, prepare_frozen
from softprompt_cli.model.soft_prompt import SoftPromptModel

TEXTS = ["a short one", "a much longer sentence that forces padding onto the others", "two words"]
LABELS = ["a", "b"]
METHODS = [
    ("prompt_tuning", {"num_virtual_tokens": 5}),
    ("p_tuning", {"num_virtual_tokens": 4, "encoder": "mlp", "encoder_hidden_size": 16}),
]
pytestmark = pytest.mark.usefixtures("computed_once_at_any_size")
NO_DROPOUT = {"attention_dropout": 0.0, "attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0}


def _frozen(path, task_type: str, pooling: str, checkpointing: bool = False, token_types: bool = False):
    tokenizer = load_tokenizer(str(path))
    if not token_types:  # the tiny models share MiniLM's tokenizer; decoders' own make no token type ids
        tokenizer.model_input_names = ["input_ids", "attention_mask"]
    base = load_base_model(str(path), revision=None, dtype="float32", trust_remote_code=False, pooling=pooling,
                           label_names=LABELS, task_type=task_type)
    for key, value in NO_DROPOUT.items():  # dropout would draw different masks for the two computations
        if hasattr(base.config, key):
            setattr(base.config, key, value)
    for module in base.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    prepare_frozen(base, tokenizer, task_type, pooling, gradient_checkpointing=checkpointing)
    return base, tokenizer


def _model(base, tokenizer, method: str, values: dict, task_type: str, pooling: str) -> SoftPromptModel:
    torch.manual_seed(3)
    words = [[tokenizer.convert_tokens_to_ids(w)] for w in ("yes", "no")] if task_type == "causal_lm" else None
    options = registry()[method](name=method, **values)
    return SoftPromptModel(base, options, tokenizer, pooling, len(LABELS), max_length=64, task_type=task_type,
                           label_word_ids=words).train()


def _batch(tokenizer, causal_lm: bool) -> dict[str, torch.Tensor]:
    tokenizer.padding_side = "left" if causal_lm else "right"
    inputs = dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))
    if causal_lm:
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        labels[:, :-2] = -100  # loss on the last tokens only, as on label words
        return {**inputs, "labels": labels}
    return {**inputs, "labels": torch.tensor([0, 1, 1])}


def virtual_tokens_once(model: SoftPromptModel, on: bool) -> None:
    model.virtual_tokens_as_prefix = on
    model.kind = "prefix" if on else "input"


def _loss_logits_gradients(model: SoftPromptModel, batch: dict, switch: Callable, on: bool):
    switch(model, on)
    model.zero_grad()
    torch.manual_seed(0)  # the same dropout masks in the head (mean pooling) for both
    output = model(**batch)
    output["loss"].backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return output["loss"].detach(), output["logits"].detach(), gradients


def assert_same_either_way(model: SoftPromptModel, batch: dict, switch: Callable = virtual_tokens_once) -> None:
    """The loss, logits and every trainable gradient with `switch(model, True)` equal those with the switch off."""
    loss, logits, gradients = _loss_logits_gradients(model, batch, switch, on=True)
    oracle_loss, oracle_logits, oracle_gradients = _loss_logits_gradients(model, batch, switch, on=False)
    torch.testing.assert_close(loss, oracle_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, oracle_logits, atol=1e-5, rtol=1e-5)
    assert gradients.keys() == oracle_gradients.keys() and any(k.startswith("prompt.") for k in gradients)
    for name in gradients:
        torch.testing.assert_close(gradients[name], oracle_gradients[name], atol=1e-5, rtol=1e-4, msg=name)


def assert_label_word_scores_same_either_way(model: SoftPromptModel, batch: dict, shortcut: str) -> None:
    """Label-word scores with the model's `shortcut` attribute on equal those with it off, for one-token words
    (one pass) and multi-token words (appended to the rows)."""
    for words in (model.label_word_ids, [[5, 6], [7]]):
        model.task_label_words = {name: words for name in model.task_names}
        scores = []
        for on in (True, False):
            setattr(model, shortcut, on)
            scores.append(model.scores(batch["input_ids"], batch["attention_mask"]))
        torch.testing.assert_close(scores[0], scores[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("method,values", METHODS, ids=[m for m, _ in METHODS])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_causal_lm_loss_and_gradients_equal_virtual_tokens_in_every_row(tiny_models, kind, method, values,
                                                                         checkpointing):
    """Tiny Llama (grouped-query attention: 4 query heads, 2 key/value heads) and GPT-2 (learned positions),
    left-padded rows of different lengths: the same loss, logits and gradients as with the prompt in each row."""
    base, tokenizer = _frozen(tiny_models[kind], "causal_lm", "model", checkpointing)
    model = _model(base, tokenizer, method, values, "causal_lm", "model")
    assert model.virtual_tokens_as_prefix and model.kind == "prefix"
    batch = _batch(tokenizer, causal_lm=True)
    assert not batch["attention_mask"].all()
    assert_same_either_way(model, batch)


@pytest.mark.parametrize("pooling", ["model", "mean"])
def test_decoder_classification_equals_virtual_tokens_in_every_row(tiny_models, pooling):
    """A decoder with a classification head (right padding; the last real token, or mean pooling)."""
    base, tokenizer = _frozen(tiny_models["llama"], "sequence_classification", pooling)
    model = _model(base, tokenizer, "prompt_tuning", {"num_virtual_tokens": 3}, "sequence_classification", pooling)
    assert_same_either_way(model, _batch(tokenizer, causal_lm=False))


def test_encoders_keep_virtual_tokens_in_the_input(tiny_models):
    """Encoders attend both ways: the prompt's states depend on the input, so it stays in every row."""
    base, tokenizer = _frozen(tiny_models["bert"], "sequence_classification", "model")
    model = _model(base, tokenizer, "prompt_tuning", {"num_virtual_tokens": 3}, "sequence_classification", "model")
    assert not model.virtual_tokens_as_prefix and model.kind == "input"


def test_token_types_that_reach_the_virtual_tokens_keep_them_in_the_input(tiny_models):
    """GPT-2 adds token type embeddings to every position, the virtual tokens' too: with a tokenizer that makes
    token type ids, the prompt's states depend on the rows' inputs."""
    base, tokenizer = _frozen(tiny_models["gpt2"], "causal_lm", "model", token_types=True)
    model = _model(base, tokenizer, "prompt_tuning", {"num_virtual_tokens": 5}, "causal_lm", "model")
    assert not model.virtual_tokens_as_prefix and model.kind == "input"


def test_sliding_window_shorter_than_the_input_keeps_virtual_tokens_in_the_input(tiny_models):
    base, tokenizer = _frozen(tiny_models["llama"], "causal_lm", "model")
    base.config.sliding_window = 32  # 5 virtual tokens + 64 input tokens would outgrow it
    model = _model(base, tokenizer, "prompt_tuning", {"num_virtual_tokens": 5}, "causal_lm", "model")
    assert not model.virtual_tokens_as_prefix and model.kind == "input"


def multitask_model(base, tokenizer, tasks: tuple[str, ...] = ("t1", "t2"), num_virtual_tokens: int = 4
                    ) -> SoftPromptModel:
    """Multitask prompt tuning on a causal LM (seed 3): two labels a task, the label words "yes" and "no"."""
    torch.manual_seed(3)
    options = registry()["multitask_prompt_tuning"](name="multitask_prompt_tuning",
                                                    num_virtual_tokens=num_virtual_tokens)
    words = {task: [[tokenizer.convert_tokens_to_ids(w)] for w in ("yes", "no")] for task in tasks}
    return SoftPromptModel(base, options, tokenizer, "model", dict.fromkeys(tasks, 2), max_length=64,
                           task_type="causal_lm", label_word_ids=words).train()


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_several_tasks_prompts_in_one_batch(tiny_models, monkeypatch, kind, packed):
    """Multitask prompt tuning: each task's prompt runs once, first in the rows' pass (one block after another),
    and each row, padded or packed with its task's rows, sees its own task's block alone."""
    base, tokenizer = _frozen(tiny_models[kind], "causal_lm", "model")
    model = multitask_model(base, tokenizer)
    model.pack_rows = packed
    with torch.no_grad():  # tasks' prompts differ (they start out equal)
        for parameter in model.prompt.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    batch = {**_batch(tokenizer, causal_lm=True), "task_ids": torch.tensor([1, 0, 1])}
    packs = []
    monkeypatch.setattr(packing, "pack", lambda *args, pack=packing.pack: packs.append(pack(*args)) or packs[-1])
    shared = []
    handle = model.base.base_model.register_forward_pre_hook(
        lambda module, args, kwargs: shared.append(kwargs.get("softprompt_shared", 0)), with_kwargs=True)
    try:
        assert_same_either_way(model, batch)
    finally:
        handle.remove()
    assert shared == [2 * 4, 0]  # the two tasks' 4 virtual tokens once; the oracle: each row its own
    assert len(packs) == packed
    scores = []  # each row's own task's label words, the tasks' rows scored apart
    for as_prefix in (True, False):
        model.virtual_tokens_as_prefix, model.kind = as_prefix, "prefix" if as_prefix else "input"
        scores.append(model.scores(batch["input_ids"], batch["attention_mask"], task_ids=batch["task_ids"]))
    torch.testing.assert_close(scores[0], scores[1], atol=1e-5, rtol=1e-5)


def test_several_tasks_generate_as_with_their_prompts_in_every_row(tiny_models):
    """Generation fills a cache, so several tasks' prompts run once in a pass of their own, as a prefix: the same
    tokens as each row holding its task's prompt."""
    base, tokenizer = _frozen(tiny_models["llama"], "causal_lm", "model")
    model = multitask_model(base, tokenizer).eval()
    with torch.no_grad():
        for parameter in model.prompt.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    batch, task_ids = _batch(tokenizer, causal_lm=True), torch.tensor([1, 0, 1])
    assert is_prefix(model._generation_prompt(task_ids, 3))
    tokens = []
    for model.virtual_tokens_as_prefix in (True, False):
        tokens.append(model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=6, stop_ids=-1,
                                     task_ids=task_ids))
    assert torch.equal(tokens[0], tokens[1])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generation_and_label_word_scores_equal_virtual_tokens_in_every_row(tiny_models, kind):
    base, tokenizer = _frozen(tiny_models[kind], "causal_lm", "model")
    model = _model(base, tokenizer, "prompt_tuning", {"num_virtual_tokens": 5}, "causal_lm", "model").eval()
    batch = _batch(tokenizer, causal_lm=True)
    results = []
    for as_prefix in (True, False):
        model.virtual_tokens_as_prefix, model.kind = as_prefix, "prefix" if as_prefix else "input"
        tokens = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=6, stop_ids=-1)
        scores = model.scores(batch["input_ids"], batch["attention_mask"])
        results.append((tokens, scores))
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-5, rtol=1e-5)
