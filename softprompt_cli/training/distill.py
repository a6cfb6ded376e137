"""Distillation for multi-task source training (MPT's paper): every task's rows also learn what an existing
single-task checkpoint of that task, its teacher, makes of them (logits by KL, last hidden states by MSE).

Teachers share the student's frozen base model; their outputs are computed before the student's forward and
passed into it, so that DDP sees one forward per step."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from softprompt_cli.assemble import attach_trained, read_trained
from softprompt_cli.config.schema import Recipe
from softprompt_cli.errors import UserError
from softprompt_cli.model.soft_prompt import NOT_A_LABEL, SoftPromptModel, distilled_states


@dataclass
class Teacher:
    model: SoftPromptModel
    head_state: dict[str, torch.Tensor]


def _checked_teacher(recipe: Recipe, task: str, folder: str, labels: list[str]):
    trained = read_trained(Path(folder))
    where = f"distillation.teachers.{task} ({folder!r})"
    if trained.recipe.is_multitask:
        raise UserError(f"{where} is a multi-task checkpoint; a teacher is a single-task checkpoint of task {task}. "
                        "Train one with that task's single-task recipe.")
    if trained.label_names != labels:
        raise UserError(f"{where} was trained with labels {trained.label_names}, task {task} has {labels}. Use a "
                        "teacher trained on this task's data.")
    own, theirs = recipe.model_task, trained.recipe.task
    if (own.type, own.pooling) != (theirs.type, theirs.pooling):
        raise UserError(f"{where} is a {theirs.type} checkpoint with pooling {theirs.pooling}; this recipe's tasks "
                        f"are {own.type} with pooling {own.pooling}. Use teachers trained with the same task.type "
                        "and task.pooling.")
    return trained


def load_teachers(recipe: Recipe, student: SoftPromptModel, tokenizer, task_labels: dict[str, list[str]]
                  ) -> dict[int, Teacher]:
    """The recipe's teachers by task index, on the student's base model (checked to be theirs), in eval mode."""
    if recipe.distillation is None:
        return {}
    config = recipe.distillation
    student.distill_weights = (config.logits_weight, config.hidden_weight, config.temperature)
    teachers = {}
    for task, folder in config.teachers.items():
        trained = _checked_teacher(recipe, task, folder, task_labels[task])
        model, head_state = attach_trained(trained, student.base, tokenizer)
        teachers[student.task_index(task)] = Teacher(model.requires_grad_(False), head_state)
    return teachers


def _one_teacher(teacher: Teacher, batch: dict, rows: torch.Tensor, causal_lm: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, distilled states, the row of each state among `rows`) of one teacher on the rows `rows` (a mask
    over the model's input rows)."""
    model = teacher.model
    input_ids, mask = batch["input_ids"][rows], batch["attention_mask"][rows]
    token_types = batch.get("token_type_ids")
    token_types = None if token_types is None else token_types[rows]
    prompt = model.prompt_for(None, len(input_ids))
    if causal_lm:  # at the student's target positions, in its order
        logits, states, keep = model.target_predictions(input_ids, mask, token_types, prompt, batch["labels"][rows])
        return logits, states, keep.nonzero()[:, 0]
    encoded = model.encode(input_ids, mask, token_types, prompt)
    states, state_rows = distilled_states(encoded)
    return model.classify(encoded, teacher.head_state or None).float(), states, state_rows


def _in_row_order(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Values of several row subsets, each with the (global) row of every value, in row order as one batch has
    them (a stable sort keeps each row's tokens in order)."""
    values = torch.cat([part for part, _ in parts])
    return values[torch.argsort(torch.cat([rows for _, rows in parts]), stable=True)]


@contextlib.contextmanager
def _in_eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """The module (the base model the teachers share with the training student) in eval mode, then every submodule
    back in its own mode: a teacher's targets must not carry the student's dropout noise."""
    modes = [(submodule, submodule.training) for submodule in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for submodule, training in modes:
            submodule.training = training


@torch.no_grad()
def teacher_outputs(teachers: dict[int, Teacher], student: SoftPromptModel, batch: dict) -> dict[str, torch.Tensor]:
    """`teacher_logits` and `teacher_states` for every row of the batch, laid out as the student's forward lays out
    its own: logits [rows, most labels] (padded with NOT_A_LABEL) or, causal_lm, [target tokens, vocabulary];
    states: as `distilled_states` (or, causal_lm, the target tokens')."""
    if not teachers:
        return {}
    input_rows = len(batch["input_ids"])
    task_ids = batch.get("task_ids", torch.zeros(input_rows, dtype=torch.long))
    sequence_tasks = torch.cat([task_ids, task_ids]) if len(task_ids) * 2 == input_rows else task_ids
    logits, states = [], []
    with _in_eval_mode(student.base):
        for index in task_ids.unique().tolist():
            rows = sequence_tasks == index
            part_logits, part_states, state_rows = _one_teacher(teachers[index], batch, rows, student.causal_lm)
            sequences = rows.nonzero().squeeze(-1)
            states.append((part_states, sequences[state_rows]))
            if student.causal_lm:  # one logit row per target token, like the states
                logits.append((part_logits, sequences[state_rows]))
                continue
            padded = part_logits.new_full((len(part_logits), student.logit_width), NOT_A_LABEL)
            padded[:, :part_logits.shape[-1]] = part_logits
            logits.append((padded, (task_ids == index).nonzero().squeeze(-1)))
    return {"teacher_logits": _in_row_order(logits), "teacher_states": _in_row_order(states)}
