"""The examples of every task of a recipe (a single-task recipe is one task)."""

from __future__ import annotations

from dataclasses import dataclass

from softprompt_cli.config.schema import Recipe
from softprompt_cli.data.sources import Examples, load_examples
from softprompt_cli.errors import UserError


@dataclass
class TaskData:
    name: str
    recipe: Recipe
    """The recipe of this task alone (its data and task sections)."""
    train: Examples
    eval: Examples
    label_names: list[str]


def load_task_data(recipe: Recipe) -> list[TaskData]:
    """Every task's training and evaluation examples and label names, in the recipe's task order."""
    tasks = []
    for name, task_recipe in recipe.task_recipes():
        try:
            train, evaluation, names = load_examples(task_recipe.data, task_recipe.task)
        except UserError as err:
            if not recipe.is_multitask:
                raise
            raise UserError(f"task {name}: {err}") from None
        tasks.append(TaskData(name, task_recipe, train, evaluation, names))
    return tasks


def task_labels(tasks: list[TaskData]) -> dict[str, list[str]]:
    return {task.name: task.label_names for task in tasks}


def all_targets(tasks: list[TaskData]) -> list[str] | None:
    """Every task's evaluation targets, one task after another (free-form causal_lm), else None."""
    free_form = [task for task in tasks if task.recipe.task.target_field is not None]
    return [target for task in free_form for target in task.eval.targets] if free_form else None
