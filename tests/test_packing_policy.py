"""When a model's training rows run packed, and which batches `training.group_by_length: auto` then gives: shuffled
where the rows run packed (grouping would save no padding and costs accuracy), grouped otherwise.

Under the real rules for computing what rows share once (no `computed_once_at_any_size` here).
"""

from __future__ import annotations

import pytest
import torch
from test_virtual_tokens_once import _frozen, multitask_model


def _causal_recipe(tmp_path, tiny_models, kind: str, method: dict, task: dict | None = None, **training):
    """A recipe on MRPC slices: causal_lm with label words (unless `task` says otherwise), batches of 16."""
    from conftest import write_recipe

    from softprompt_cli.config.load import load_recipe

    if task is None:
        task = {"type": "causal_lm", "template": "{sentence1} / {sentence2} =",
                "label_words": {"0": " no", "1": " yes"}}
    return load_recipe(write_recipe(tmp_path, str(tiny_models[kind]), method, task=task,
                                    training={"batch_size": 16, **training}))


SENTENCES = [5 + (7 * row) % 40 for row in range(200)]
"""Rows of 5 to 44 tokens, as SST-2's sentences after a template (about 19 tokens a row on average there)."""


@pytest.mark.parametrize("kind,method,batch_size,lengths,packs", [
    ("llama", {"name": "prompt_tuning", "num_virtual_tokens": 10}, 16, SENTENCES, True),
    ("gpt2", {"name": "prefix_tuning"}, 4, SENTENCES, True),
    # 2 rows: 10 positions saved by running the virtual tokens once, and packing the pair saves the rest
    ("llama", {"name": "prompt_tuning", "num_virtual_tokens": 10}, 2, SENTENCES, True),
    ("llama", {"name": "prompt_tuning", "num_virtual_tokens": 10}, 2, [20] * 200, False),  # the prompt stays in rows
    ("gpt2", {"name": "prefix_tuning"}, 16, [20] * 100 + [21] * 100, False),  # no padding to pack away
    ("gemma3", {"name": "prefix_tuning"}, 16, SENTENCES, False),  # a 12-token window the rows could outgrow
])
def test_which_models_pack_training_rows(tmp_path, tiny_models, kind, method, batch_size, lengths, packs):
    from softprompt_cli.assemble import build_model

    recipe = _causal_recipe(tmp_path, tiny_models, kind, method)
    model, _ = build_model(recipe, ["0", "1"])
    assert model.packs_training_rows(torch.device("cpu"), batch_size, lengths) is packs
    assert not model.packs_training_rows(torch.device("meta"), batch_size, lengths)  # not a CPU


def test_a_multi_task_prompt_per_task_is_grouped(tiny_models):
    """Rows of several tasks' prompts pack each task's apart, slower than grouped batches: auto groups them."""
    base, tokenizer = _frozen(tiny_models["llama"], "causal_lm", "model")
    two = multitask_model(base, tokenizer, num_virtual_tokens=10)
    one = multitask_model(base, tokenizer, ("t1",), num_virtual_tokens=10)
    cpu = torch.device("cpu")
    assert not two.packs_training_rows(cpu, 16, SENTENCES) and one.packs_training_rows(cpu, 16, SENTENCES)


@pytest.mark.parametrize("kind,method,setting,grouped", [
    ("llama", {"name": "prefix_tuning"}, "auto", False),  # its rows run packed
    ("bert", {"name": "prefix_tuning"}, "auto", True),  # an encoder: padded rows
    ("llama", {"name": "prefix_tuning"}, True, True),
    ("bert", {"name": "prefix_tuning"}, False, False),
])
def test_auto_is_decided_for_the_model_and_kept_in_the_runs_recipe(tmp_path, tiny_models, kind, method, setting,
                                                                  grouped):
    from accelerate import Accelerator

    from softprompt_cli.training.loop import set_up

    task = {} if kind == "bert" else None
    recipe = _causal_recipe(tmp_path, tiny_models, kind, method, task=task, group_by_length=setting)
    run = set_up(recipe, Accelerator(cpu=True))
    assert run.recipe.training.group_by_length is grouped  # what the saved state will hold


@pytest.mark.parametrize("setting,grouped", [(True, True), (False, False), ("auto", True)])
def test_the_training_loader_groups_as_the_recipe_says(tmp_path, tiny_models, setting, grouped):
    """`auto` left undecided (a script's recipe, not set up for a model) gives grouped batches."""
    from softprompt_cli.data.batching import training_loader
    from softprompt_cli.data.tasks import load_task_data
    from softprompt_cli.model.loading import load_tokenizer

    recipe = _causal_recipe(tmp_path, tiny_models, "llama", {"name": "prefix_tuning"}, group_by_length=setting)
    loader = training_loader(recipe, load_task_data(recipe), load_tokenizer(str(tiny_models["llama"])))
    assert loader.sampler.group is grouped


def test_group_by_length_defaults_to_auto(tmp_path, tiny_models):
    assert _causal_recipe(tmp_path, tiny_models, "llama", {"name": "prefix_tuning"}).training.group_by_length == "auto"


def test_a_wrong_group_by_length_gets_one_message(tmp_path, tiny_models):
    from softprompt_cli.config.load import RecipeError

    with pytest.raises(RecipeError) as refused:
        _causal_recipe(tmp_path, tiny_models, "llama", {"name": "prefix_tuning"}, group_by_length="atuo")
    message = str(refused.value)
    assert "has 1 problem(s)" in message
    assert "training.group_by_length: 'atuo' is not one of true, false, auto" in message


@pytest.mark.parametrize("saved,setting,resumed", [(True, "auto", True), (False, "auto", False), (True, True, True)])
def test_a_resumed_run_keeps_the_saved_runs_batching(tmp_path, tiny_models, saved, setting, resumed):
    """A run saved on another device (or before `auto`: the old default, true) resumes with the batches it drew."""
    from softprompt_cli.training.resume import check_resumable, with_saved_batching

    recipe = _causal_recipe(tmp_path, tiny_models, "llama", {"name": "prefix_tuning"}, group_by_length=setting)
    state = recipe.model_dump(mode="json")
    state["training"]["group_by_length"] = saved
    check_resumable(state, recipe, tmp_path)
    assert with_saved_batching(recipe, state).training.group_by_length is resumed


def test_rows_pack_where_their_device_leaves_out_enough(monkeypatch):
    """Each device type its own least share of positions that packing must leave out (a GPU's is higher: its step
    is bound more by launching kernels than by positions); other devices never pack."""
    from softprompt_cli.model import packing

    mask = torch.tensor([[1] * 6, [1] * 6, [1] * 2 + [0] * 4])  # one packed row of 14 for 18 padded positions
    assert packing.positions_saved(mask) == 4  # 22%: over a CPU's fifth
    monkeypatch.setitem(packing.PACKING_MIN_SAVED_SHARE, "cpu", packing.PACKING_MIN_SAVED_SHARE["cuda"])
    assert packing.positions_saved(mask) == 0
    assert packing.positions_saved(mask.to("meta")) == 0
