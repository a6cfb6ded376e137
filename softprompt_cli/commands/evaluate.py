"""`softprompt eval`: a trained checkpoint (or PEFT adapter) on its recipe's eval split or another split, on another
recipe's data (`--recipe`), on a new labelled file (`--data`), or with its data section changed (`data.KEY=VALUE`).

Whatever the data, the label mapping is the checkpoint's: a recipe whose labels differ, or a row whose label the
checkpoint does not know, is refused. Options that conflict are refused too, never silently ignored.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from softprompt_cli import precision
from softprompt_cli.assemble import Trained, model_from_trained, read_trained
from softprompt_cli.commands.arguments import FILE_KEYS, SOURCE_KEYS, check_eval_options, check_precision_option
from softprompt_cli.config.load import apply_overrides, parse_recipe, resolve_paths
from softprompt_cli.config.schema import Recipe, TaskEntry
from softprompt_cli.data.batching import evaluation_loader
from softprompt_cli.data.glue import GLUE_TASKS
from softprompt_cli.data.sources import (
    Examples,
    Table,
    has_labels,
    label_field,
    label_key,
    label_names,
    read_split,
    text_fields,
    to_examples,
)
from softprompt_cli.data.tasks import TaskData, all_targets
from softprompt_cli.errors import UserError
from softprompt_cli.model.loading import Geometry
from softprompt_cli.training.control import finish, fresh_accelerator
from softprompt_cli.training.evaluate import evaluate


def _data_for_file(trained: Trained, data_file: Path) -> dict[str, Any]:
    """The checkpoint's data section read from one labelled file, with its own fields and label names."""
    own = trained.recipe.data
    data = {k: v for k, v in own.model_dump(mode="json").items()
            if k not in (*SOURCE_KEYS, *FILE_KEYS, "max_train_samples", "max_eval_samples")}
    data.update(files={"train": str(data_file), "validation": str(data_file)}, label_field=label_field(own),
                label_names=list(trained.label_names) or None)
    if trained.recipe.task.type != "causal_lm":
        data["text_fields"] = text_fields(own)
    return data


def eval_recipe(trained: Trained, data_recipe: Recipe | None, data_file: Path | None,
                overrides: list[str]) -> Recipe:
    """The checkpoint's recipe with the data to evaluate: its own, --recipe's, or --data's, then the overrides."""
    if data_file is not None:
        data = _data_for_file(trained, data_file)
    else:
        data = (data_recipe or trained.recipe).data.model_dump(mode="json")
    data = apply_overrides({"data": data}, overrides)["data"]
    what = " and ".join(w for w, given in (("--recipe", data_recipe), ("--data", data_file),
                                           ("the data.* overrides", overrides)) if given)
    own = trained.recipe.to_dict()
    # The checkpoint's metrics, whatever the data: a GLUE task's default metrics would fall away with its data.
    task = {**own["task"], "metrics": trained.recipe.metrics}
    recipe = parse_recipe({**own, "task": task, "data": data},
                          source=f"the data to evaluate {str(trained.directory)!r} on ({what or 'its own'})")
    return resolve_paths(recipe)


def _declared_label_names(recipe: Recipe) -> list[str] | None:
    """Label names a data section states without reading rows (data.label_names, a GLUE task's)."""
    if recipe.data.label_names:
        return list(recipe.data.label_names)
    return list(GLUE_TASKS[recipe.data.glue_task].label_names) if recipe.data.glue_task else None


def check_label_names(trained: Trained, recipe: Recipe, from_other_recipe: bool) -> None:
    """The data's label names must be the checkpoint's, in its order (label ids index them)."""
    if not has_labels(recipe.task):
        return
    names = _declared_label_names(recipe)
    if names is None and from_other_recipe:  # as training would name them: from all of the train split
        whole = recipe.data.model_copy(update={"validation_fraction": None})
        names = label_names(whole, read_split(whole, whole.train_split))
    if names is not None and names != list(trained.label_names):
        unknown = [n for n in names if n not in trained.label_names]
        raise UserError(
            f"the data's labels are {names}, but checkpoint {str(trained.directory)!r} was trained with "
            f"{list(trained.label_names)} (label ids follow this order)"
            + (f"; it does not know {', '.join(map(repr, unknown))}" if unknown else "")
            + ". Evaluate on data with the checkpoint's labels: set data.label_names to "
            f"{list(trained.label_names)} if these are the same classes, or use data for the checkpoint's task.")


def check_rows_labels(trained: Trained, recipe: Recipe, table: Table, limit: int | None) -> None:
    """Name the labels in the rows to evaluate that the checkpoint does not know (with the first row of each)."""
    if not has_labels(recipe.task):
        return
    names = list(trained.label_names)
    field = label_field(recipe.data)
    numeric = not any(name.lstrip("-").isdecimal() for name in names)  # GLUE's 0/1 index the names
    unknown: dict[str, int] = {}
    for number, row in enumerate(table.rows[:limit] if limit else table.rows, 1):
        key = label_key(row[field]) if row.get(field) is not None else ""
        if key and key not in names and not (numeric and key.isdecimal() and int(key) < len(names)):
            unknown.setdefault(key, number)
    if unknown:
        listing = ", ".join(f"{key!r} (row {number})" for key, number in list(unknown.items())[:5])
        raise UserError(
            f"{table.origin} has label(s) checkpoint {str(trained.directory)!r} does not know: {listing}"
            + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            + f". It predicts only {names}: remove those rows or write them as one of these labels.")


def load_eval_examples(trained: Trained, recipe: Recipe, split: str, limit: int | None,
                       new_data: bool) -> Examples:
    """The examples to evaluate, labelled with the checkpoint's label ids."""
    table = read_split(recipe.data, split)
    if new_data:
        check_rows_labels(trained, recipe, table, limit)
    return to_examples(recipe.data, recipe.task, table, list(trained.label_names), limit)


def _check_length(model, recipe: Recipe) -> None:
    """A data.max_length other than the checkpoint's must still fit the model's positions."""
    limit = Geometry.of(model.base.config).max_positions
    if limit and recipe.method.num_virtual_tokens + recipe.data.max_length > limit:
        raise UserError(f"method.num_virtual_tokens ({recipe.method.num_virtual_tokens}) + data.max_length "
                        f"({recipe.data.max_length}) exceeds the model's {limit} positions. Lower data.max_length.")


def chosen_tasks(trained: Trained, task: str | None, other_data: bool) -> list[str]:
    """The checkpoint's tasks to evaluate: --task, or all of them (other data is one task's: --task)."""
    names = list(trained.task_labels)
    if task is None:
        if other_data and trained.recipe.is_multitask:
            raise UserError(f"checkpoint {str(trained.directory)!r} has several tasks ({', '.join(names)}); other "
                            "data (--recipe, --data, data.* overrides) is one task's: name it with --task.")
        return names
    if not trained.recipe.is_multitask:
        raise UserError(f"--task {task!r}: checkpoint {str(trained.directory)!r} has one task; --task chooses among "
                        "the tasks of a multi-task checkpoint. Drop --task.")
    if task not in names:
        raise UserError(f"--task {task!r} is not a task of checkpoint {str(trained.directory)!r} (its tasks: "
                        f"{', '.join(names)}). Name one of them.")
    return [task]


def task_view(trained: Trained, name: str, data_recipe: Recipe | None) -> tuple[Trained, Recipe | None]:
    """One task of a checkpoint as if it were a single-task checkpoint, and that task's part of --recipe."""
    if not trained.recipe.is_multitask:
        return trained, data_recipe
    recipe = dict(trained.recipe.task_recipes())[name]
    if data_recipe is not None and data_recipe.is_multitask:
        own = dict(data_recipe.task_recipes())
        if name not in own:
            raise UserError(f"--recipe has no task {name!r} (its tasks: {', '.join(own)}). Give a recipe with that "
                            "task, or a single-task recipe.")
        data_recipe = own[name]
    view = Trained(trained.directory, recipe, trained.task_labels[name], trained.base_model, trained.tensors,
                   trained.from_peft, {name: trained.task_labels[name]})
    return view, data_recipe


def task_examples(view: Trained, data_recipe: Recipe | None, data_file: Path | None, overrides: list[str],
                  split: str | None, keys: list[str]) -> TaskData:
    """One task's data to evaluate, checked against the checkpoint's labels."""
    other_recipe = data_recipe is not None and not view.from_peft
    recipe = eval_recipe(view, data_recipe if other_recipe else None, data_file, overrides)
    check_label_names(view, recipe, other_recipe)
    try:
        recipe.task.positive_index(list(view.label_names))
    except ValueError as err:
        raise UserError(str(err)) from None
    split = split or recipe.data.eval_split
    limit = recipe.data.max_eval_samples if split == recipe.data.eval_split or "max_eval_samples" in keys else None
    examples = load_eval_examples(view, recipe, split, limit, other_recipe or data_file is not None or bool(keys))
    return TaskData(next(iter(view.task_labels)), recipe, Examples([], []), examples, list(view.label_names))


def evaluated_recipe(trained: Trained, tasks: list[TaskData]) -> Recipe:
    """What is evaluated: a single task's recipe, or the checkpoint's recipe with the evaluated tasks' data."""
    if not trained.recipe.is_multitask:
        return tasks[0].recipe
    entries = [TaskEntry(name=task.name, data=task.recipe.data, task=task.recipe.task) for task in tasks]
    return trained.recipe.model_copy(update={"tasks": entries})


def evaluate_checkpoint(directory: Path, split: str | None = None, model_path: str | None = None,
                        output: Path | None = None, data_recipe: Recipe | None = None,
                        data_file: Path | None = None, overrides: list[str] | None = None,
                        task: str | None = None, precision_option: str = "checkpoint") -> dict[str, Any]:
    """Evaluate as the options say (`precision_option`: checkpoint, fp32 or bf16); the report of `softprompt eval`."""
    overrides = list(overrides or [])
    keys = check_eval_options(directory, split, data_recipe, data_file, overrides)
    check_precision_option(precision_option)
    trained = read_trained(directory, model_path, data_recipe)
    other_data = (data_recipe is not None and not trained.from_peft) or data_file is not None or bool(overrides)
    tasks = [task_examples(*task_view(trained, name, data_recipe), data_file, overrides, split, keys)
             for name in chosen_tasks(trained, task, other_data)]
    recipe = evaluated_recipe(trained, tasks)
    accelerator = fresh_accelerator()
    model, tokenizer = model_from_trained(trained)
    for one in tasks:
        _check_length(model, one.recipe)
    loader = evaluation_loader(recipe, tasks, tokenizer, model.task_names)
    model, eval_loader = accelerator.prepare(model, loader)
    labels = {one.name: one.label_names for one in tasks} if recipe.is_multitask else tasks[0].label_names
    ran = precision.for_inference(precision_option, trained.recipe.training.mixed_precision, accelerator.device)
    note = precision.emulation_note(precision_option, ran, accelerator.device)
    if note and accelerator.is_main_process:
        print(f"note: {note}", file=sys.stderr)
    with precision.autocast(ran, accelerator.device.type):
        results = evaluate(model, eval_loader, accelerator, recipe, labels, tokenizer, all_targets(tasks),
                           model_tasks=accelerator.unwrap_model(model).task_names)
    splits = sorted({split or one.recipe.data.eval_split for one in tasks})
    report = {"checkpoint": str(directory), "split": str(data_file) if data_file is not None else ", ".join(splits),
              "examples": sum(len(one.eval) for one in tasks), "precision": precision.display_name(ran),
              "metrics": results}
    if output is not None and accelerator.is_main_process:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2) + "\n")
    finish(accelerator)
    return report
