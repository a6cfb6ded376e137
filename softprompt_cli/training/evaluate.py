"""Evaluation inside and outside training: every task's metrics (and their mean), gathered over processes."""

from __future__ import annotations

from statistics import mean

import torch
from accelerate import Accelerator

from softprompt_cli import metrics
from softprompt_cli.config.schema import MEAN_METRIC, SINGLE_TASK, Recipe
from softprompt_cli.model import lm


def _row_tasks(batch: dict) -> list[int]:
    task_ids = batch.get("task_ids")
    return task_ids.tolist() if task_ids is not None else [0] * len(batch["input_ids"])


def _generated(unwrapped, batch: dict, recipes: dict[int, Recipe], tokenizer, with_prompt: bool) -> list[str]:
    """Each row's generated text, at most its task's task.max_new_tokens tokens long."""
    limits = [recipes[task].task.max_new_tokens for task in _row_tasks(batch)]
    stop_ids = lm.stop_token_ids(unwrapped.base, tokenizer)
    generated = unwrapped.generate(batch["input_ids"], batch["attention_mask"], max(limits), stop_ids,
                                   with_prompt=with_prompt, task_ids=batch.get("task_ids"))
    return tokenizer.batch_decode([lm.until_stop(tokens[:limit], stop_ids)
                                   for tokens, limit in zip(generated.tolist(), limits)], skip_special_tokens=True)


@torch.no_grad()
def predictions(model, eval_loader, accelerator: Accelerator, recipes: dict[int, Recipe], tokenizer,
                targets: list[str] | None, with_prompt: bool = True) -> list[tuple[int, object, object]]:
    """(task index, prediction, reference) of every evaluation row, gathered from all processes: predicted label
    ids (a head's argmax, or the most likely label word), or generated texts against `targets`. `recipes`: each
    evaluated task's recipe by its index in the model."""
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.eval()
    rows: list[tuple[int, object, object]] = []
    for batch in eval_loader:
        tasks = _row_tasks(batch)
        if "target_index" in batch:
            texts = _generated(unwrapped, batch, recipes, tokenizer, with_prompt)
            rows += accelerator.gather_for_metrics(
                [(task, text, targets[i]) for task, text, i in zip(tasks, texts, batch["target_index"].tolist())])
            continue
        labels = batch.pop("labels")
        scores = unwrapped.scores(**batch, with_prompt=with_prompt)
        gathered = accelerator.gather_for_metrics((torch.tensor(tasks, device=labels.device), scores.argmax(-1),
                                                   labels))
        rows += zip(*(part.tolist() for part in gathered))
    unwrapped.train()
    return rows


def task_metrics(recipe: Recipe, rows: list[tuple[int, object, object]], task_labels: dict[str, list[str]],
                 model_tasks: list[str]) -> dict[str, float]:
    """A single-task recipe's metrics; a multi-task recipe's `<task>/<metric>` for every task, and `mean`, the mean
    over tasks of each one's main metric."""
    results: dict[str, float] = {}
    for name, task_recipe in recipe.task_recipes():
        labels, index = task_labels[name], model_tasks.index(name)
        own = [(prediction, reference) for task, prediction, reference in rows if task == index]
        values = metrics.compute(task_recipe.metrics, [p for p, _ in own], [r for _, r in own], len(labels),
                                 task_recipe.task.positive_index(labels))
        if name == SINGLE_TASK:
            return values
        results |= {f"{name}/{metric}": value for metric, value in values.items()}
    results[MEAN_METRIC] = mean(results[f"{name}/{task_recipe.main_metric}"]
                                for name, task_recipe in recipe.task_recipes())
    return results


def evaluate(model, eval_loader, accelerator: Accelerator, recipe: Recipe, labels: list[str] | dict[str, list[str]],
             tokenizer, targets: list[str] | None, with_prompt: bool = True, model_tasks: list[str] | None = None
             ) -> dict:
    """The recipe's metrics on the eval loader (every task's, for a multi-task recipe), gathered over processes.
    `labels`: the label names, or each task's; `model_tasks`: the model's tasks, where the recipe evaluates some."""
    task_labels = labels if isinstance(labels, dict) else {SINGLE_TASK: labels}
    model_tasks = model_tasks or recipe.task_names
    recipes = {model_tasks.index(name): task_recipe for name, task_recipe in recipe.task_recipes()}
    rows = predictions(model, eval_loader, accelerator, recipes, tokenizer, targets, with_prompt)
    return task_metrics(recipe, rows, task_labels, model_tasks)
