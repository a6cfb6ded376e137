"""Multitask prompt tuning and PEFT, both ways: exported MPT checkpoints load in PEFT (MULTITASK_PROMPT_TUNING)
with the same logits per task, exported and PEFT-made MPT adapters evaluate here like the checkpoint, and what
PEFT cannot express is refused with the reason."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from conftest import GLUE_DIR, cli_exit_code

peft = pytest.importorskip("peft")

PAIRS = (["the first sentence of a pair", "short"], ["its second sentence", "another, longer second sentence"])
LM_TEXTS = ["a fine film It was", "the worst plot It was"]
TRAINING = {"batch_size": 8, "eval_batch_size": 8, "max_steps": 2, "lr": 5e-2, "log_steps": 2}


def _data(glue_task: str) -> dict:
    return {"glue_task": glue_task, "dir": str(GLUE_DIR), "max_train_samples": 16, "max_eval_samples": 8}


def _lm_task(name: str, glue_task: str, words: dict) -> dict:
    return {"name": name, "data": _data(glue_task),
            "task": {"type": "causal_lm", "template": "{sentence} It was", "label_words": words}}


LM_TASKS = [_lm_task("sst2", "sst2", {"0": " bad", "1": " good"}), _lm_task("cola", "cola", {"0": " no", "1": " yes"})]


def _write(folder, model, method: dict, **sections) -> object:
    folder.mkdir(parents=True, exist_ok=True)
    recipe = {"model": {"name_or_path": str(model)}, "method": {"num_virtual_tokens": 4, **method},
              "training": TRAINING, "output": {"dir": str(folder / "run")}, **sections}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory):
    """A single-task classification MPT checkpoint (BERT), a two-task causal_lm one (GPT-2), and a two-task
    causal_lm prompt tuning one (one prompt, the shared LM head: a plain PEFT prompt tuning adapter), trained and
    exported."""
    root = tmp_path_factory.mktemp("mpt_peft")
    mpt = {"name": "multitask_prompt_tuning", "rank": 2}
    runs = {"single": _write(root / "single", tiny_models["bert"], mpt, data=_data("mrpc"),
                             task={"pooling": "model", "prompt_position": "start"}),
            "multi": _write(root / "multi", tiny_models["gpt2"], mpt, tasks=LM_TASKS),
            "multi_prompt_tuning": _write(root / "multi_pt", tiny_models["gpt2"], {"name": "prompt_tuning"},
                                          tasks=LM_TASKS)}
    for recipe in runs.values():
        assert cli_exit_code("train", recipe) == 0
        assert cli_exit_code("export", recipe.parent / "run" / "final", recipe.parent / "adapter") == 0
    return {**runs, "root": root}


def _checkpoint(recipe):
    return recipe.parent / "run" / "final"


def _adapter(recipe):
    return recipe.parent / "adapter"


def _lm_logits(model, tokenizer, task_ids):
    """Our model's next-token logits after each text, each row with its task's prompt."""
    rows = tokenizer(LM_TEXTS, return_tensors="pt")
    with torch.no_grad():
        prompts = model.prompt_for(task_ids, len(task_ids))
        return model.lm_head(model.encode(rows["input_ids"], rows["attention_mask"], None, prompts).states[:, -1])


def _peft_lm_logits(base_path, adapter, task_ids):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = AutoTokenizer.from_pretrained(base_path)(LM_TEXTS, return_tensors="pt")
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), adapter).eval()
    with torch.no_grad():  # PEFT's logits also cover the virtual tokens: the last position is the text's
        return model(**rows, task_ids=task_ids).logits[:, -1]


def test_single_task_classification_export_gives_peft_logits(runs, tiny_models):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from softprompt_cli.assemble import load_trained

    adapter = _adapter(runs["single"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["num_tasks"], config["num_ranks"]) == (
        "MULTITASK_PROMPT_TUNING", "SEQ_CLS", 1, 2)
    inputs = AutoTokenizer.from_pretrained(tiny_models["bert"])(*PAIRS, padding=True, return_tensors="pt")
    task_ids = torch.zeros(2, dtype=torch.long)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"], num_labels=2)
    theirs = peft.PeftModel.from_pretrained(base, adapter).eval()
    _, ours, _, _ = load_trained(_checkpoint(runs["single"]))
    with torch.no_grad():
        expected = theirs(**inputs, task_ids=task_ids).logits
        actual = ours.eval()(**inputs, task_ids=task_ids)["logits"]
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_multitask_causal_lm_export_gives_peft_logits_per_task(runs, tiny_models):
    from softprompt_cli.assemble import load_trained

    adapter = _adapter(runs["multi"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["task_type"], config["num_tasks"]) == ("CAUSAL_LM", 2)
    assert json.loads((adapter / "tasks.json").read_text()) == {"sst2": ["negative", "positive"],
                                                               "cola": ["unacceptable", "acceptable"]}
    _, ours, tokenizer, _ = load_trained(_checkpoint(runs["multi"]))
    ours.eval()
    assert ours.task_names == ["sst2", "cola"]
    for task_ids in ([0, 1], [1, 0], [1, 1]):  # mixed tasks in one batch, in both orders
        ids = torch.tensor(task_ids)
        torch.testing.assert_close(_lm_logits(ours, tokenizer, ids),
                                   _peft_lm_logits(tiny_models["gpt2"], adapter, ids), atol=1e-5, rtol=1e-5)
    # the tasks' prompts differ, so a task mix-up would show above
    assert not torch.allclose(ours.task_prompt("sst2"), ours.task_prompt("cola"), atol=1e-5)


@pytest.mark.parametrize("which", ["single", "multi", "multi_prompt_tuning"])
def test_exported_adapter_evaluates_like_the_checkpoint(runs, run_cli, tmp_path, which):
    recipe = runs[which]
    config = json.loads((_adapter(recipe) / "adapter_config.json").read_text())
    assert config["peft_type"] == ("PROMPT_TUNING" if which == "multi_prompt_tuning" else "MULTITASK_PROMPT_TUNING")
    code, out, err = run_cli("eval", _checkpoint(recipe), "--output", tmp_path / "ours.json")
    assert code == 0, out + err
    code, out, err = run_cli("eval", _adapter(recipe), "--recipe", recipe, "--output", tmp_path / "peft.json")
    assert code == 0, out + err
    ours, theirs = (json.loads((tmp_path / f"{name}.json").read_text())["metrics"] for name in ("ours", "peft"))
    assert theirs == ours and (which == "single" or {"sst2/accuracy", "cola/accuracy"} <= set(ours))


def test_exported_classification_adapter_predicts_like_the_checkpoint(runs, run_cli):
    predictions = []
    for folder in (_checkpoint(runs["single"]), _adapter(runs["single"])):
        code, out, err = run_cli("predict", folder, "--text", PAIRS[0][0], "--text-pair", PAIRS[1][0])
        assert code == 0, out + err
        predictions.append(json.loads(out)["pred_probabilities"])
    assert predictions[0] == predictions[1] and list(predictions[0]) == ["not_equivalent", "equivalent"]


@pytest.fixture(scope="module")
def peft_made(runs, tiny_models):
    """A two-task CAUSAL_LM MPT adapter PEFT made (no tasks.json), with factors far from PEFT's near-zero start so
    that a task mix-up shows."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    config = peft.MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, num_tasks=2, num_ranks=2)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_models["gpt2"]), config)
    with torch.no_grad():
        for name in ("prefix_task_cols", "prefix_task_rows"):
            getattr(model.prompt_encoder["default"], name).normal_()
    model.save_pretrained(runs["root"] / "peft_made")
    return runs["root"] / "peft_made"


def test_peft_made_multitask_adapter_reads_here_with_peft_logits(runs, tiny_models, peft_made):
    """Its tasks are the recipe's, in the recipe's order."""
    from softprompt_cli.assemble import load_trained
    from softprompt_cli.config.load import load_recipe

    _, ours, tokenizer, _ = load_trained(peft_made, data_recipe=load_recipe(runs["multi"]))
    ids = torch.tensor([1, 0])
    torch.testing.assert_close(_lm_logits(ours.eval(), tokenizer, ids),
                               _peft_lm_logits(tiny_models["gpt2"], peft_made, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("source", ["exported", "peft_made"])
def test_causal_lm_adapter_starts_a_target_run(runs, peft_made, source):
    """An MPT adapter is a source prompt without a recipe, whatever its task type: its tasks are those exported
    with it, or (PEFT's own) numbered as PEFT's prompt_tuning_init_task counts them."""
    from safetensors.torch import load_file

    from softprompt_cli.assemble import build_model
    from softprompt_cli.config.load import load_recipe

    adapter, task, index = (_adapter(runs["multi"]), "cola", 1) if source == "exported" else (peft_made, "1", 1)
    recipe = load_recipe(runs["multi"])
    recipe.method = recipe.method.model_copy(update={"init": "source_task", "init_checkpoint": str(adapter),
                                                     "init_task": task})
    model, _ = build_model(recipe, {"sst2": ["negative", "positive"], "cola": ["unacceptable", "acceptable"]})
    saved = load_file(adapter / "adapter_model.safetensors")
    torch.testing.assert_close(model.prompt.embedding.data, saved["prompt_embeddings"])
    for k in range(2):  # every target task starts from the chosen source task's factors
        torch.testing.assert_close(model.prompt.task_cols.data[k], saved["prefix_task_cols"][index])
        torch.testing.assert_close(model.prompt.task_rows.data[k], saved["prefix_task_rows"][index])


def _refused(result, *reasons):
    code, out, err = result
    message = " ".join(err.split())
    assert code == 2 and "Traceback" not in out + err, out + err
    assert all(reason in message for reason in reasons), message


def test_export_refuses_a_multitask_classification_checkpoint(tiny_models, tmp_path, run_cli):
    tasks = [{"name": name, "data": _data(name), "task": {"pooling": "model", "prompt_position": "start"}}
             for name in ("sst2", "cola")]
    recipe = _write(tmp_path, tiny_models["bert"], {"name": "multitask_prompt_tuning"}, tasks=tasks,
                    training={**TRAINING, "max_steps": 1})
    assert run_cli("train", recipe)[0] == 0
    _refused(run_cli("export", tmp_path / "run" / "final", tmp_path / "adapter"),
             "2 tasks (sst2, cola)", "one classifier", "task.type: causal_lm")
    assert not (tmp_path / "adapter").exists()


def test_import_refuses_what_the_recipe_cannot_supply(runs, run_cli, tmp_path):
    adapter = _adapter(runs["multi"])
    _refused(run_cli("predict", adapter, "--text", "a fine film"), "CAUSAL_LM", "--recipe")
    _refused(run_cli("eval", adapter, "--recipe", runs["single"]), "task.type is sequence_classification")
    one_task = yaml.safe_load(runs["multi"].read_text())
    one_task["tasks"] = one_task["tasks"][:1]
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(one_task))
    _refused(run_cli("eval", adapter, "--recipe", tmp_path / "one.yaml"), "has 2 task(s) (sst2, cola)",
             "the recipe has 1")
    renamed = yaml.safe_load(runs["multi"].read_text())
    renamed["tasks"][1]["name"] = "acceptability"
    (tmp_path / "renamed.yaml").write_text(yaml.safe_dump(renamed))
    _refused(run_cli("eval", adapter, "--recipe", tmp_path / "renamed.yaml"), "Name the recipe's tasks")
    shared_head = tmp_path / "shared_head"
    shutil.copytree(_adapter(runs["single"]), shared_head)
    config = json.loads((shared_head / "adapter_config.json").read_text())
    (shared_head / "adapter_config.json").write_text(json.dumps({**config, "num_tasks": 2}))
    _refused(run_cli("eval", shared_head, "--recipe", runs["single"]), "share one classifier", "num_tasks: 1")
