"""`softprompt predict`: one frozen model, several trained soft prompts, rows of different tasks in
the same forward batch (each row with its own prompt and head).

A multi-task checkpoint serves each of its tasks (named by its recipe, or NAME/TASK given NAME=DIR), all on
its one SoftPromptModel. Tasks can share a forward pass when their prompts have the same kind and length and
their heads read the same thing (hidden states, or the model's own pooler); others go in separate batches.
causal_lm checkpoints rank their label words (probabilities over the label words; the tasks of one checkpoint
share batches) or generate text, one task per batch.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress
from transformers import DataCollatorWithPadding

from softprompt_cli.assemble import Trained, attach_trained, load_frozen, read_trained
from softprompt_cli.commands.arguments import check_predict_input
from softprompt_cli.config.schema import SINGLE_TASK, Recipe
from softprompt_cli.data.sources import input_fields, read_table, row_texts
from softprompt_cli.data.templates import render
from softprompt_cli.errors import UserError
from softprompt_cli.model.lm import Sampling
from softprompt_cli.model.soft_prompt import Encoded, SoftPromptModel


@dataclass
class Task:
    name: str
    recipe: Recipe
    label_names: list[str]
    model: SoftPromptModel
    head_state: dict[str, torch.Tensor]
    knows_its_texts: bool = True
    """False for PEFT adapters: they do not record how many texts a row has."""
    model_task: str = SINGLE_TASK
    """The task's name in its model (a multi-task checkpoint's task, whose head and prompt it picks)."""
    checkpoint: int = 0
    """Which loaded checkpoint it comes from: the tasks of one causal_lm model can share its forward passes."""
    prompt: torch.Tensor = field(init=False)
    """The prompt's inference form, computed once (P-tuning's encoder output, projected prefixes)."""

    @property
    def batch_key(self) -> tuple:
        if self.model.causal_lm:  # generation lengths are per task; label words are routed by task id
            return ("causal_lm", self.checkpoint, self.name if self.generates else "")
        return (self.model.kind, self.model.num_virtual_tokens, self.model.insert_at,
                self.model.head_reads_model_pooler)

    @property
    def task_id(self) -> int:
        return self.model.task_index(self.model_task)

    @property
    def generates(self) -> bool:
        return self.recipe.task.target_field is not None

    @property
    def separate_pair(self) -> bool:
        return self.recipe.task.pooling == "pair_mean"


def _parse_reference(reference: str) -> tuple[str | None, Path]:
    name, sep, path = reference.partition("=")
    return (name, Path(path)) if sep and name and not Path(reference).exists() else (None, Path(reference))


def _served_names(name: str | None, directory: Path, trained: Trained) -> dict[str, str]:
    """Each task the checkpoint serves, by the name rows give it -> its name in the model."""
    if not trained.recipe.is_multitask:
        return {name or (directory.parent.name if directory.name in ("best", "final") else directory.name):
                SINGLE_TASK}
    return {f"{name}/{task}" if name else task: task for task in trained.task_labels}


def _read_named(references: list[str], model_path: str | None) -> list[tuple[Trained, dict[str, str]]]:
    """Each checkpoint (`DIR` or `NAME=DIR`) read, with the tasks it serves (see `_served_names`); task names
    unique, one kind of task, one base model."""
    loaded: list[tuple[Trained, dict[str, str]]] = []
    taken: set[str] = set()
    for reference in references:
        name, directory = _parse_reference(reference)
        trained = read_trained(directory, model_path)
        names = _served_names(name, directory, trained)
        clash = sorted(taken & set(names))
        if clash:
            raise UserError(f"two checkpoints have the same task name ({', '.join(map(repr, clash))}); name them: "
                            "NAME=DIR (a multi-task checkpoint's tasks are then NAME/TASK).")
        taken |= set(names)
        loaded.append((trained, names))
    if len({t.recipe.model_task.type for t, _ in loaded}) > 1:
        raise UserError("the checkpoints mix causal_lm and sequence_classification tasks; predict with each kind "
                        "separately.")
    if len({t.base_model["fingerprint"] for t, _ in loaded}) > 1:
        models = sorted({t.base_model["name_or_path"] for t, _ in loaded})
        raise UserError(f"the checkpoints were trained on different base models ({', '.join(models)}); "
                        "predict serves checkpoints of one base model at a time.")
    return loaded


def load_tasks(references: list[str], model_path: str | None = None) -> tuple[dict[str, Task], Any]:
    """Load checkpoints (`DIR` or `NAME=DIR`) onto one shared frozen base model: one Task per task they serve
    (a multi-task checkpoint: one per task of it, all on its one model)."""
    loaded = _read_named(references, model_path)
    first = loaded[0][0]
    own_head = [t for t, _ in loaded if t.recipe.model_task.pooling == "model"]
    # A multi-task checkpoint has no label_names of its own: its first task's labels size the base model's head.
    base, tokenizer = load_frozen(first.recipe, next(iter((own_head or [first])[0].task_labels.values())),
                                  pooling="model" if own_head else "mean")
    base.eval()
    tasks = {}
    for number, (trained, names) in enumerate(loaded):
        model, head_state = attach_trained(trained, base, tokenizer)
        recipes = dict(trained.recipe.task_recipes())
        for name, model_task in names.items():
            task = Task(name, recipes[model_task], trained.task_labels[model_task], model, head_state,
                        not trained.from_peft, model_task, number)
            with torch.no_grad():
                task.prompt = model.task_prompt(model_task)
            tasks[name] = task
    return tasks, tokenizer


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
        scores = task.model.scores(batch["input_ids"], batch["attention_mask"], task_ids=task_ids)
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
    encoded = model.encode(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"), per_row)
    probabilities: list[torch.Tensor] = [None] * len(items)  # type: ignore[list-item]
    for task, members, rows in blocks:
        part = Encoded(encoded.states[rows], encoded.real_tokens[rows], encoded.attention_mask[rows])
        logits = task.model.classify(part, task.head_state or None, task=task.model_task)
        for i, p in zip(members, logits.float().softmax(-1)):
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
    tokens = task.model.generate(batch["input_ids"], batch["attention_mask"],
                                 generation.max_new_tokens or task.recipe.task.max_new_tokens,
                                 tokenizer.eos_token_id, generation.sampling,
                                 task_ids=_task_ids(items, batch["input_ids"].device))
    return tokenizer.batch_decode(tokens, skip_special_tokens=True)


def predict(items: list[Item], tokenizer, batch_size: int, progress: bool = False,
            generation: Generation | None = None) -> list[torch.Tensor | str]:
    """Label probabilities for each item, or its generated text (causal_lm tasks with free-form targets)."""
    generation = generation or Generation()
    collate = DataCollatorWithPadding(tokenizer)
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
            if members[0].task.generates:
                outputs = generate_batch(members, collate, tokenizer, generation)
            else:
                outputs = predict_batch(members, collate)
            for i, output in zip(indices, outputs):
                results[i] = output
            bar.advance(job, len(indices))
    return results


OUTPUT_PREFIX = "pred_"
"""Every column predict adds starts with this; input columns are kept as they are."""


def check_input_columns(rows: list[dict]) -> None:
    """Refuse input columns that start with OUTPUT_PREFIX: an output column could overwrite them."""
    taken = sorted({str(k) for row in rows for k in row if str(k).startswith(OUTPUT_PREFIX)})
    if taken:
        raise UserError(
            f"the input has column(s) {', '.join(map(repr, taken))}: predict keeps every input column and adds its "
            "own, pred_task, pred_label, pred_score, pred_probabilities (pred_p_<label> in csv/tsv) and "
            f"pred_generated, so input columns starting with {OUTPUT_PREFIX!r} could be overwritten. Rename or drop "
            "those columns (e.g. when predicting on an earlier output).")


def records(rows: list[dict], items: list[Item], outputs: list[torch.Tensor | str]) -> list[dict]:
    """Each input row with the prediction in `pred_` columns (run_predict refused input columns named so)."""
    out = []
    for item, p in zip(items, outputs):
        prediction: dict[str, Any] = {"pred_task": item.task.name}
        if isinstance(p, str):
            prediction["pred_generated"] = p
        else:
            best = int(p.argmax())
            prediction.update(pred_label=item.task.label_names[best], pred_score=round(float(p[best]), 6),
                              pred_probabilities={n: round(float(v), 6) for n, v in zip(item.task.label_names, p)})
        out.append({**rows[item.row], **prediction})
    return out


def write_records(results: list[dict], output: Path | None) -> None:
    if output is None or output.suffix.lower() in (".jsonl", ".json"):
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
        if output is None:
            sys.stdout.write(lines)
        else:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(lines, encoding="utf-8")
        return
    if output.suffix.lower() not in (".csv", ".tsv"):
        raise UserError(f"--output {str(output)!r}: write .jsonl, .csv or .tsv.")
    flat = [{**{k: v for k, v in r.items() if k != "pred_probabilities"},
             **{f"pred_p_{name}": v for name, v in r.get("pred_probabilities", {}).items()}} for r in results]
    columns = list(dict.fromkeys(k for r in flat for k in r))
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, columns, delimiter="\t" if output.suffix.lower() == ".tsv" else ",")
        writer.writeheader()
        writer.writerows(flat)


def run_predict(references: list[str], input_file: Path | None, texts: list[str], text_pairs: list[str],
                output: Path | None, task_column: str, fields_override: list[str] | None, batch_size: int,
                model_path: str | None, generation: Generation | None = None, task: str | None = None) -> list[dict]:
    check_predict_input(input_file, texts, text_pairs)
    if input_file is not None:
        rows = read_table(input_file, recipe=False)
    else:
        fields_override = ["text", "text_pair"] if text_pairs else ["text"]
        rows = [{"text": t, **({"text_pair": p} if text_pairs else {})}
                for t, p in zip(texts, text_pairs or texts)]
    if not rows:  # before loading any model
        raise UserError("the input has no rows. Give at least one text.")
    check_input_columns(rows)
    tasks, tokenizer = load_tasks(references, model_path)
    items = make_items(rows, tasks, tokenizer, task_column, fields_override,
                       repr(str(input_file)) if input_file is not None else "the --text arguments", task)
    outputs = predict(items, tokenizer, batch_size, progress=len(items) > 1000 and output is not None,
                      generation=generation)
    results = records(rows, items, outputs)
    write_records(results, output)
    return results
