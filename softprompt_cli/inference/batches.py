"""Predictions for tokenized rows of loaded tasks: rows of different tasks in the same forward batch (each row
with its own prompt and head).

Tasks can share a forward pass when their prompts have the same kind and length and their heads read the same
thing (hidden states, or the model's own pooler); others go in separate batches. causal_lm checkpoints rank their
label words (probabilities over the label words; the tasks of one checkpoint share batches) or generate text, one
task per batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rich.progress import Progress
from transformers import DataCollatorWithPadding

from softprompt_cli import precision
from softprompt_cli.data.sources import input_fields, row_texts
from softprompt_cli.data.templates import render
from softprompt_cli.errors import UserError
from softprompt_cli.inference.tasks import Task
from softprompt_cli.model import lm
from softprompt_cli.model.lm import Sampling
from softprompt_cli.model.soft_prompt import Encoded


class Collator:
    """Pads tokenized rows into a batch, on the device the model runs on."""

    def __init__(self, tokenizer, device: torch.device):
        self.pad = DataCollatorWithPadding(tokenizer)
        self.device = device

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        return {name: tensor.to(self.device) for name, tensor in self.pad(features).items()}


@dataclass
class Item:
    """One prediction to make: an input row for one task."""

    row: int
    task: Task
    sequences: list[dict]  # tokenized: one, or two for pair_mean


def check_task_choice(tasks: dict[str, Task], task: str | None) -> None:
    """--task must name one of the loaded tasks."""
    if task is not None and task not in tasks:
        raise UserError(f"--task {task!r} is not a task of the loaded checkpoints (their tasks: {', '.join(tasks)}). "
                        "Name one of them, or drop --task to route rows by their task column.")


def _row_tasks(row: dict, number: int, tasks: dict[str, Task], task_column: str | None, origin: str) -> list[Task]:
    """The tasks a row goes to: the one its task column names, or every loaded task."""
    if not (task_column and task_column in row):
        return list(tasks.values())
    name = str(row[task_column])
    if name not in tasks:
        raise UserError(f"row {number + 1} of {origin} names task {name!r}, which is not one of the loaded "
                        f"checkpoints' tasks ({', '.join(tasks)}). Fix the {task_column!r} column, load that "
                        "checkpoint, or send every row to one task with --task.")
    return [tasks[name]]


def make_items(rows: list[dict], tasks: dict[str, Task], tokenizer, task_column: str | None,
               fields_override: list[str] | None, origin: str = "the input", only_task: str | None = None
               ) -> list[Item]:
    """One item per row and task (`only_task`: every row that task's, whatever its task column says); a row
    whose text is null, empty, a list or an object is refused (numbers are read as their text)."""
    check_task_choice(tasks, only_task)
    items = []
    for number, row in enumerate(rows):
        targets = [tasks[only_task]] if only_task else _row_tasks(row, number, tasks, task_column, origin)
        for task in targets:
            expected = input_fields(task.recipe.data, task.recipe.task)
            fields = fields_override or expected
            if task.knows_its_texts and len(fields) != len(expected):
                raise UserError(f"task {task.name} reads {len(expected)} text(s) per row ({expected}), but "
                                f"{len(fields)} were given ({fields}). Give --text-pair (or two --text-field) for "
                                "pair tasks, one text for single-text tasks.")
            missing = [f for f in fields if f not in row]
            if missing:
                raise UserError(f"row {number + 1} of {origin} has no {', '.join(map(repr, missing))} (task "
                                f"{task.name} reads {fields}; the row has {sorted(row)}). Name the text columns with "
                                "--text-field.")
            texts = list(row_texts(row, fields, number + 1, origin))
            limit = task.recipe.data.max_length
            if task.model.causal_lm:  # long inputs keep their end, where the template's cue is
                ids = tokenizer(render(task.recipe.task.template, expected, tuple(texts)))["input_ids"][-limit:]
                sequences = [{"input_ids": ids, "attention_mask": [1] * len(ids)}]
            elif task.separate_pair:
                sequences = [dict(tokenizer(t, truncation=True, max_length=limit)) for t in texts]
            else:
                sequences = [dict(tokenizer(*texts, truncation=True, max_length=limit))]
            items.append(Item(number, task, sequences))
    return items


@torch.no_grad()
def predict_batch(items: list[Item], collate) -> list[torch.Tensor]:
    """Probabilities for each item; all items share one forward pass through the frozen model."""
    task = items[0].task
    if task.model.causal_lm:  # one model per batch: the probabilities of each row's task's label words
        batch = collate([item.sequences[0] for item in items])
        task_ids = _task_ids(items, batch["input_ids"].device)
        scores = task.model.scores(batch["input_ids"], batch["attention_mask"], task_ids=task_ids).cpu()
        return [row[:len(item.task.label_names)].softmax(-1) for row, item in zip(scores, items)]
    order = sorted(range(len(items)), key=lambda i: items[i].task.name)  # each task's rows contiguous
    blocks, sequences, prompts = [], [], []
    for name in dict.fromkeys(items[i].task.name for i in order):
        members = [i for i in order if items[i].task.name == name]
        task = items[members[0]].task
        width = len(items[members[0]].sequences)
        start = len(sequences)
        for slot in range(width):  # pair_mean wants all first texts, then all second texts
            sequences += [items[i].sequences[slot] for i in members]
        prompts += [task.prompt] * (len(sequences) - start)
        blocks.append((task, members, slice(start, len(sequences))))
    batch = collate(sequences)
    model = blocks[0][0].model
    per_row = torch.stack(prompts) if model.kind == "input" else torch.cat(prompts, dim=2)
    groups = [block for block, (_, _, rows) in enumerate(blocks) for _ in range(rows.start, rows.stop)]
    encoded = model.encode(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"), per_row,
                           prompt_groups=groups)
    probabilities: list[torch.Tensor] = [None] * len(items)  # type: ignore[list-item]
    for task, members, rows in blocks:
        part = Encoded(encoded.states[rows], encoded.real_tokens[rows], encoded.attention_mask[rows])
        logits = task.model.classify(part, task.head_state or None, task=task.model_task)
        for i, p in zip(members, logits.float().softmax(-1).cpu()):
            probabilities[i] = p
    return probabilities


@dataclass
class Generation:
    max_new_tokens: int | None = None
    """None: each task's task.max_new_tokens."""
    sampling: Sampling | None = None
    """None: greedy."""


def _task_ids(items: list[Item], device: torch.device) -> torch.Tensor | None:
    """Each item's task id in its (multi-task) model, which picks its prompt and label words; None: one task."""
    if not items[0].task.model.multitask:
        return None
    return torch.tensor([item.task.task_id for item in items], device=device)


def generate_batch(items: list[Item], collate, tokenizer, generation: Generation) -> list[str]:
    task = items[0].task
    batch = collate([item.sequences[0] for item in items])
    stop_ids = lm.stop_token_ids(task.model.base, tokenizer)
    tokens = task.model.generate(batch["input_ids"], batch["attention_mask"],
                                 generation.max_new_tokens or task.recipe.task.max_new_tokens, stop_ids,
                                 generation.sampling, task_ids=_task_ids(items, batch["input_ids"].device))
    return [lm.continuation_text(tokenizer, item.sequences[0]["input_ids"], lm.until_stop(row, stop_ids))
            for item, row in zip(items, tokens.cpu().tolist())]


def predict(items: list[Item], tokenizer, batch_size: int, progress: bool = False,
            generation: Generation | None = None) -> list[torch.Tensor | str]:
    """Label probabilities for each item, or its generated text (causal_lm tasks with free-form targets)."""
    generation = generation or Generation()
    if not items:
        return []
    collate = Collator(tokenizer, items[0].task.device)
    # Group compatible tasks, then similar lengths, so that batches share a forward pass and pad little.
    order = sorted(range(len(items)), key=lambda i: (items[i].task.batch_key,
                                                     -max(len(s["input_ids"]) for s in items[i].sequences)))
    results: list[torch.Tensor] = [None] * len(items)  # type: ignore[list-item]
    batches, current = [], []
    for i in order:
        if current and (len(current) == batch_size or items[current[0]].task.batch_key != items[i].task.batch_key):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    with Progress(disable=not progress, transient=True, console=None) as bar:
        job = bar.add_task("predict", total=len(items))
        for indices in batches:
            members = [items[i] for i in indices]
            task = members[0].task  # a batch's tasks share a precision: it is part of their batch_key
            with precision.autocast(task.precision, task.device.type):
                if task.generates:
                    outputs = generate_batch(members, collate, tokenizer, generation)
                else:
                    outputs = predict_batch(members, collate)
            for i, output in zip(indices, outputs):
                results[i] = output
            bar.advance(job, len(indices))
    return results


def label_record(label_names: list[str], probabilities: torch.Tensor) -> dict:
    """A prediction as predict and serve give it: the likeliest label, its probability and every label's."""
    values = probabilities.tolist()  # one conversion: indexing a tensor per label costs more than the rest
    best = max(range(len(values)), key=values.__getitem__)  # the first of equal maxima, as argmax
    return {"label": label_names[best], "score": round(values[best], 6),
            "probabilities": {n: round(v, 6) for n, v in zip(label_names, values)}}
