"""`softprompt predict` on multi-task checkpoints (multitask prompt tuning, and plain prompt tuning on several tasks):
each task of a checkpoint served on its one model, rows of different tasks in the same forward batch."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import GLUE_DIR, cli_exit_code

EVAL_ROWS = 12
"""Rows of each task's eval split to predict: the first ones, which `eval` scores too."""
BERT_TASKS = {"sst2": {"pooling": "mean"}, "cola": {"pooling": "mean"}, "mrpc": {"pooling": "mean"}}
LM_TASKS = {
    "sst2": {"type": "causal_lm", "template": "Review: {sentence} Sentiment:",
             "label_words": {"negative": " bad", "positive": " good"}},
    # Multi-token words: each row is scored once per label, with its own task's prompt.
    "cola": {"type": "causal_lm", "template": "Sentence: {sentence} Is it grammatical?",
             "label_words": {"unacceptable": " no it is not", "acceptable": " yes"}},
}


def train(folder, model, method: str, tasks: dict[str, dict]):
    folder.mkdir()
    recipe = {
        "model": {"name_or_path": str(model)},
        "tasks": [{"name": name, "task": task,
                   "data": {"glue_task": name, "dir": str(GLUE_DIR), "max_train_samples": 32,
                            "max_eval_samples": EVAL_ROWS}} for name, task in tasks.items()],
        "method": {"name": method, "num_virtual_tokens": 4},
        "training": {"batch_size": 8, "eval_batch_size": 16, "max_steps": 2, "lr": 1e-2},
        "output": {"dir": str(folder / "run")},
    }
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert cli_exit_code("train", folder / "recipe.yaml") == 0
    return folder / "run" / "final"


@pytest.fixture(scope="module")
def checkpoints(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("multitask")
    return {
        "mpt": train(root / "mpt", tiny_models["bert"], "multitask_prompt_tuning", BERT_TASKS),
        "pt": train(root / "pt", tiny_models["bert"], "prompt_tuning", BERT_TASKS),
        "lm": train(root / "lm", tiny_models["gpt2"], "multitask_prompt_tuning", LM_TASKS),
    }


def eval_rows(tasks: dict[str, dict]) -> list[dict]:
    """The first EVAL_ROWS rows of each task's eval split, interleaved, each with its task, text fields and gold
    label (as the label's index)."""
    from softprompt_cli.config.schema import DataSection, TaskSection
    from softprompt_cli.data.sources import input_fields, label_field, read_split

    per_task = []
    for name, task in tasks.items():
        data = DataSection(glue_task=name, dir=str(GLUE_DIR))
        fields = input_fields(data, TaskSection(**task))
        rows = read_split(data, data.eval_split).rows[:EVAL_ROWS]
        per_task.append([{"task": name, **{f: row[f] for f in fields}, "gold": int(row[label_field(data)])}
                         for row in rows])
    return [row for group in zip(*per_task) for row in group]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def predict(run_cli, *args) -> list[dict]:
    code, out, err = run_cli("predict", *map(str, args))
    assert code == 0, out + err
    return [json.loads(line) for line in out.splitlines()]


def assert_same_predictions(alone: list[dict], together: list[dict]) -> None:
    assert [r["pred_label"] for r in alone] == [r["pred_label"] for r in together]
    for a, b in zip(alone, together):
        assert list(a["pred_probabilities"]) == list(b["pred_probabilities"])
        assert all(abs(a["pred_probabilities"][k] - b["pred_probabilities"][k]) < 1e-5 for k in a["pred_probabilities"])


def check_mixed_equals_alone_and_eval(tmp_path, run_cli, checkpoint, tasks: dict[str, dict]) -> None:
    rows = eval_rows(tasks)
    mixed = predict(run_cli, checkpoint, "--input", write_jsonl(tmp_path / "mixed.jsonl", rows), "--batch-size", 5)
    assert [r["pred_task"] for r in mixed] == [r["task"] for r in rows]
    code, out, err = run_cli("eval", checkpoint, "--output", tmp_path / "eval.json")
    assert code == 0, out + err
    metrics = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    for name in tasks:
        own = [{k: v for k, v in r.items() if k != "task"} for r in rows if r["task"] == name]
        alone = predict(run_cli, checkpoint, "--task", name, "--input", write_jsonl(tmp_path / f"{name}.jsonl", own),
                        "--batch-size", 3)
        assert {r["pred_task"] for r in alone} == {name}
        assert_same_predictions(alone, [r for r in mixed if r["pred_task"] == name])
        # eval scores the same rows: its accuracy is the one the predicted labels give.
        hits = [list(r["pred_probabilities"]).index(r["pred_label"]) == r["gold"] for r in alone]
        assert sum(hits) / len(hits) == pytest.approx(metrics[f"{name}/accuracy"])


@pytest.mark.parametrize("method", ["mpt", "pt"])
def test_mixed_tasks_of_a_multitask_checkpoint_equal_each_task_alone(tmp_path, checkpoints, run_cli, method):
    check_mixed_equals_alone_and_eval(tmp_path, run_cli, checkpoints[method], BERT_TASKS)


def test_causal_lm_multitask_checkpoint_routes_label_words(tmp_path, checkpoints, run_cli):
    check_mixed_equals_alone_and_eval(tmp_path, run_cli, checkpoints["lm"], LM_TASKS)


def test_all_tasks_of_a_checkpoint_share_forward_batches(checkpoints):
    from softprompt_cli.inference.tasks import load_tasks

    tasks, _ = load_tasks([f"mpt={checkpoints['mpt']}", f"pt={checkpoints['pt']}"])
    assert list(tasks) == [f"{ref}/{name}" for ref in ("mpt", "pt") for name in BERT_TASKS]
    assert len({task.batch_key for task in tasks.values()}) == 1
    assert len({id(task.model) for task in tasks.values()}) == 2  # one model per checkpoint, not per task
    lm_tasks, _ = load_tasks([str(checkpoints["lm"])])
    assert len({task.batch_key for task in lm_tasks.values()}) == 1


def test_named_multitask_checkpoints_serve_together(tmp_path, checkpoints, run_cli):
    """NAME=DIR names a multi-task checkpoint's tasks NAME/TASK, so two with the same tasks load side by side."""
    rows = eval_rows(BERT_TASKS)[:6]
    refs = [f"mpt={checkpoints['mpt']}", f"pt={checkpoints['pt']}"]
    both = [{**row, "task": f"{ref}/{row['task']}"} for ref in ("mpt", "pt") for row in rows]
    together = predict(run_cli, *refs, "--input", write_jsonl(tmp_path / "both.jsonl", both))
    assert [r["pred_task"] for r in together] == [r["task"] for r in both]
    for ref in ("mpt", "pt"):
        alone = predict(run_cli, checkpoints[ref], "--input", write_jsonl(tmp_path / f"{ref}.jsonl", rows))
        assert_same_predictions(alone, together[:len(rows)] if ref == "mpt" else together[len(rows):])


@pytest.mark.parametrize("case, message", [
    ("unknown_task_option", "--task 'nope' is not a task of the loaded checkpoints (their tasks: sst2, cola, mrpc)"),
    ("unknown_task_column", "names task 'qnli', which is not one of the loaded checkpoints' tasks (sst2, cola, mrpc)"),
    ("same_task_names", "two checkpoints have the same task name ('cola', 'mrpc', 'sst2'); name them: NAME=DIR"),
])
def test_bad_task_choices_are_refused(tmp_path, checkpoints, run_cli, case, message):
    source = write_jsonl(tmp_path / "rows.jsonl", [{"task": "sst2", "sentence": "fine"},
                                                   {"task": "qnli", "sentence": "what?"}])
    args = {"unknown_task_option": [checkpoints["mpt"], "--task", "nope"],
            "unknown_task_column": [checkpoints["mpt"]],
            "same_task_names": [checkpoints["mpt"], checkpoints["pt"]]}[case]
    code, out, err = run_cli("predict", *args, "--input", source)
    assert code == 2, out + err
    assert message in " ".join(err.split()) and "Traceback" not in out + err
