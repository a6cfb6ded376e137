"""Multi-task recipes (tasks, task_sampling, distillation) and multitask_prompt_tuning's source checkpoints: bad
input is refused by `softprompt validate` (torch-free) or `softprompt train` / `eval` with exit code 2 and a
message naming the problem and its fix, never a traceback; compare trains every method on all the tasks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import GLUE_DIR, NO_HEAVY_IMPORTS, REPO, cli_exit_code

MPT = "multitask_prompt_tuning"


def refused(result: tuple[int, str, str], *needles: str) -> str:
    code, out, err = result
    assert code == 2, out + err
    assert "Traceback" not in out + err
    flat = " ".join(err.split())  # the console wraps long lines
    for needle in needles:
        assert needle in flat, f"{needle!r} not in {err!r}"
    return flat


def glue(task: str, max_length: int = 32) -> dict:
    return {"glue_task": task, "dir": str(GLUE_DIR), "max_train_samples": 24, "max_eval_samples": 16,
            "max_length": max_length}


def multitask_recipe(folder: Path, model: str, method: dict | None = None, **sections) -> Path:
    """A two-task recipe (sst2, mrpc) of one training step; `sections` replace the recipe's top-level ones."""
    recipe = {
        "model": {"name_or_path": model},
        "tasks": [{"name": "sst2", "data": glue("sst2")}, {"name": "mrpc", "data": glue("mrpc", 48)}],
        "method": {"name": MPT, "num_virtual_tokens": 4, **(method or {})},
        "training": {"batch_size": 8, "eval_batch_size": 16, "max_steps": 1, "log_steps": 1},
        "output": {"dir": str(folder / "run")},
        **sections,
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def config_only_model(tmp_path_factory) -> str:
    """A model folder with only config.json: all that validate reads of a model (no torch needed)."""
    folder = tmp_path_factory.mktemp("config_only_bert")
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "max_position_embeddings": 160}))
    return str(folder)


@pytest.fixture(scope="module")
def source(tiny_models, tmp_path_factory) -> Path:
    """A multitask_prompt_tuning source checkpoint of tasks sst2 and mrpc on tiny BERT (one step)."""
    folder = tmp_path_factory.mktemp("mpt_source")
    assert cli_exit_code("train", multitask_recipe(folder, str(tiny_models["bert"]))) == 0
    return folder / "run" / "final"


# ----------------------------------------------------------------------------- validate: the recipe itself


def test_validate_multitask_recipe_summarises_tasks_without_torch(tmp_path, config_only_model):
    recipe = multitask_recipe(tmp_path, config_only_model, task_sampling={"rule": "temperature", "temperature": 3})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", NO_HEAVY_IMPORTS, "validate", str(recipe)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "exit 0" in result.stdout, result.stdout + result.stderr
    line = result.stdout
    assert "2 tasks" in line and "task_sampling temperature 3" in line
    assert "sst2: 24 train / 16 eval examples" in line and "mrpc: 24 train / 16 eval examples" in line


@pytest.mark.parametrize("change, needles", [
    ({"tasks.1.name": "sst2"}, ["task name(s) sst2 appear more than once", "give every task its own name"]),
    ({"method.rank": 5}, ["rank 5 is above num_virtual_tokens 4", "Use rank <= 4"]),
    ({"data": {"glue_task": "sst2"}}, ["give data (and task) for one task, or tasks", "not both"]),
    ({"tasks.1": {"name": "mrpc"}}, ["tasks[1].data: required, but missing"]),
    ({"distillation": {"teachers": {"sst2": "a", "qnli": "b"}}},
     ["distillation.teachers needs one teacher checkpoint for every task", "qnli not in tasks (sst2, mrpc)",
      "none for mrpc"]),
    ({"tasks.1.task": {"pooling": "mean"}}, ["the tasks share one model, so they must agree on task.pooling"]),
    ({"tasks.0.data.glue_tsk": "sst2"}, ["tasks[0].data.glue_tsk: unknown key (did you mean 'glue_task'?)"]),
    ({"task_sampling.rul": "uniform"}, ["task_sampling.rul: unknown key (did you mean 'rule'?)"]),
    ({"distillation": {"teachers": {"sst2": "a", "mrpc": "b"}, "tempreature": 2}},
     ["distillation.tempreature: unknown key (did you mean 'temperature'?)"]),
    ({"tasks.1.nme": "x"}, ["tasks[1].nme: unknown key (did you mean 'name'?)"]),
], ids=["duplicate-name", "rank-above-tokens", "data-and-tasks", "task-without-data", "unknown-teacher",
        "pooling-disagrees", "typo-in-task-data", "typo-in-task-sampling", "typo-in-distillation", "typo-in-task"])
def test_validate_refuses_bad_multitask_recipe(tmp_path, run_cli, config_only_model, change, needles):
    recipe = multitask_recipe(tmp_path, config_only_model)
    overrides = [f"{key}={json.dumps(value)}" for key, value in change.items()]
    refused(run_cli("validate", recipe, *overrides), str(recipe), *needles)


def test_single_task_data_typo_still_gets_a_hint(tmp_path, run_cli, config_only_model):
    """data is optional now (in favour of tasks): the hint must still look inside it."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name_or_path": config_only_model}, "data": glue("sst2"),
                                      "method": {"name": MPT, "num_virtual_tokens": 4}}))
    refused(run_cli("validate", recipe, "data.max_lenght=16"),
            "data.max_lenght: unknown key (did you mean 'max_length'?)")


def test_validate_reports_every_task_data_and_the_longest_max_length(tmp_path, run_cli, config_only_model):
    recipe = multitask_recipe(tmp_path, config_only_model)
    refused(run_cli("validate", recipe, f"tasks.0.data.dir={tmp_path / 'nowhere'}", "tasks.1.data.max_length=200"),
            "2 problem(s)", f"tasks.sst2.data: GLUE folder '{tmp_path / 'nowhere'}'",
            "method.num_virtual_tokens (4) + tasks.mrpc.data.max_length (200) = 204 exceeds the model's 160 positions")


def test_override_of_a_missing_task_entry(tmp_path, run_cli, config_only_model):
    refused(run_cli("validate", multitask_recipe(tmp_path, config_only_model), "tasks.2.data.max_length=64"),
            "override 'tasks.2.data.max_length'", "0 to 1")


def test_validate_checks_checkpoint_folders(tmp_path, run_cli, config_only_model):
    not_a_checkpoint = tmp_path / "empty"
    not_a_checkpoint.mkdir()
    recipe = multitask_recipe(tmp_path, config_only_model, {"init": "source_shared",
                                                            "init_checkpoint": str(tmp_path / "missing")},
                              distillation={"teachers": {"sst2": str(not_a_checkpoint), "mrpc": str(tmp_path)}})
    refused(run_cli("validate", recipe), "3 problem(s)",
            f"method.init_checkpoint: '{tmp_path / 'missing'}' does not exist",
            f"distillation.teachers.sst2: '{not_a_checkpoint}' is not a checkpoint folder",
            "distillation.teachers.mrpc:", "Give a best/ or final/ folder written by `softprompt train`")


# ----------------------------------------------------------------------------- source checkpoints, eval --task


def test_source_task_missing_from_source_checkpoint(tmp_path, run_cli, tiny_models, source):
    method = {"init": "source_task", "init_checkpoint": str(source), "init_task": "qnli"}
    recipe = multitask_recipe(tmp_path, str(tiny_models["bert"]), method)
    needles = ["method.init_task", "'qnli' is not a task of", "its tasks: sst2, mrpc", "Name one of them"]
    refused(run_cli("validate", recipe), *needles)
    refused(run_cli("train", recipe), *needles)
    assert not (tmp_path / "run" / "final").exists()


def test_teacher_that_is_a_multitask_checkpoint(tmp_path, run_cli, tiny_models, source):
    recipe = multitask_recipe(tmp_path, str(tiny_models["bert"]), {"name": "prompt_tuning"},
                              distillation={"teachers": {"sst2": str(source), "mrpc": str(source)}})
    refused(run_cli("validate", recipe), "distillation.teachers.sst2", "is a multi-task checkpoint",
            "a teacher is a single-task checkpoint of task sst2")


def test_source_checkpoint_of_another_base_model(tmp_path, run_cli, tiny_models, source):
    method = {"init": "source_average", "init_checkpoint": str(source)}
    recipe = multitask_recipe(tmp_path, str(tiny_models["gpt2"]), method)
    refused(run_cli("train", recipe), f"method.init_checkpoint '{source}' was trained on", "not on this recipe's model",
            "Start from a source checkpoint of the same base model")


def test_eval_task_the_checkpoint_lacks(run_cli, source):
    refused(run_cli("eval", source, "--task", "qnli"), "--task 'qnli' is not a task of checkpoint", "sst2, mrpc")


# ----------------------------------------------------------------------------- compare


def test_compare_trains_every_method_on_all_tasks(tmp_path, run_cli, tiny_models):
    recipe = multitask_recipe(tmp_path, str(tiny_models["bert"]))
    code, out, err = run_cli("compare", recipe, "--methods", f"prompt_tuning,{MPT}", "-o", tmp_path / "cmp")
    assert code == 0, out + err
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "| best sst2/accuracy | best mrpc/accuracy | best mrpc/f1 | best mean |" in report
    assert "Majority class: sst2 accuracy" in report and "; mean " in report
    methods = json.loads((tmp_path / "cmp" / "summary.json").read_text())["recipes"][str(recipe)]["methods"]
    for method in ("prompt_tuning", MPT):
        assert f"| {method} |" in report
        assert set(methods[method][0]["summary"]["final"]) == {"sst2/accuracy", "mrpc/accuracy", "mrpc/f1", "mean"}
