"""Reading examples from GLUE_DIR folders, local files, or the Hub; mapping labels to ids.

Local files are read without torch or transformers, so `softprompt validate` can check columns
and labels of the real data.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from softprompt_cli.config.schema import DataSection, TaskSection
from softprompt_cli.data.glue import GLUE_HUB_ID, GLUE_TASKS
from softprompt_cli.data.templates import label_word_list, render, template_fields
from softprompt_cli.errors import UserError
from softprompt_cli.hub import hub_reachable

csv.field_size_limit(sys.maxsize)


@dataclass
class Examples:
    texts: list[tuple[str, ...]]
    """The input texts of each example; causal_lm: one text, the filled-in template."""
    labels: list[int]
    """Label ids; empty for free-form causal_lm targets."""
    targets: list[str] | None = None
    """causal_lm: what the model should write after each input (its label word, or the target text)."""

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class Table:
    rows: list[dict]
    origin: str
    label_names: list[str] | None = None
    """Names the source itself knows (a hub ClassLabel feature)."""


def glue_dir(data: DataSection) -> Path | None:
    folder = data.dir or os.environ.get("GLUE_DIR")
    return Path(folder).expanduser() if folder else None


def text_fields(data: DataSection) -> list[str]:
    if data.text_fields:
        return list(data.text_fields)
    task = GLUE_TASKS[data.glue_task]
    return list(task.text_columns if glue_dir(data) else task.hub_text_fields)


def input_fields(data: DataSection, task: TaskSection) -> list[str]:
    """The columns an example's input is made of: the template's for causal_lm, else the text fields."""
    return template_fields(task.template) if task.type == "causal_lm" else text_fields(data)


def has_labels(task: TaskSection) -> bool:
    return task.target_field is None


def label_field(data: DataSection) -> str:
    if data.label_field:
        return data.label_field
    if data.glue_task and glue_dir(data):
        return GLUE_TASKS[data.glue_task].label_column
    return "label"


def _file_format(path: Path, declared: str | None) -> str:
    if declared:
        return declared
    suffix = path.suffix.lower().lstrip(".")
    formats = {"csv": "csv", "tsv": "tsv", "txt": "tsv", "jsonl": "jsonl", "json": "jsonl", "parquet": "parquet"}
    if suffix not in formats:
        raise UserError(f"cannot tell the format of {str(path)!r} from its extension; set data.format "
                        "(csv, tsv, jsonl or parquet).")
    return formats[suffix]


def read_table(path: Path, file_format: str | None = None, columns: list[str] | None = None) -> list[dict]:
    """Rows of a csv/tsv/jsonl/parquet file. csv/tsv values stay strings; quotes in tsv are text (GLUE)."""
    if not path.is_file():
        raise UserError(f"data file {str(path)!r} does not exist. Check the path in the recipe's data section.")
    kind = _file_format(path, file_format)
    if kind == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if kind == "jsonl":
        rows = []
        with path.open(encoding="utf-8-sig") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise UserError(f"{str(path)!r} line {number} is not valid JSON ({err.msg}).") from None
        return rows
    with path.open(encoding="utf-8-sig", newline="") as handle:
        if kind == "tsv":
            reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        else:
            reader = csv.reader(handle)
        lines = [line for line in reader if line]
    header, body = (list(columns), lines) if columns else (lines[0] if lines else [], lines[1:])
    return [dict(zip(header, line)) for line in body]


def _hub_table(dataset: str, config: str | None, split: str) -> Table:
    if not hub_reachable():
        raise UserError(
            f"dataset {dataset!r} would come from the Hugging Face Hub, which is unreachable from this machine. "
            "Use local files instead (data.files, or data.dir / GLUE_DIR for GLUE tasks)."
        )
    import datasets

    try:
        table = datasets.load_dataset(dataset, config, split=split)
    except Exception as err:  # datasets raises many types; all mean "this source cannot be read"
        raise UserError(f"could not load split {split!r} of dataset {dataset!r}: {err}") from None
    label = table.features.get("label")
    return Table(table.to_list(), f"{dataset}[{split}]", list(getattr(label, "names", None) or []) or None)


def read_split(data: DataSection, split: str) -> Table:
    if data.files is not None:
        if split not in data.files:
            raise UserError(f"data.files has no {split!r} split; it has {', '.join(data.files)}.")
        path = Path(data.files[split]).expanduser()
        return Table(read_table(path, data.format, data.columns), str(path))
    if data.dataset is not None:
        return _hub_table(data.dataset, data.dataset_config, split)
    task = GLUE_TASKS[data.glue_task]
    folder = glue_dir(data)
    if folder is None:
        return _hub_table(GLUE_HUB_ID, data.glue_task, split)
    if not folder.is_dir():
        raise UserError(f"GLUE folder {str(folder)!r} (data.dir or $GLUE_DIR) does not exist. Point it at a "
                        "folder holding MRPC/, SST-2/, ... or remove it to read the task from the Hub.")
    if split not in task.split_files:
        raise UserError(f"GLUE task {data.glue_task} has no split {split!r}; it has {', '.join(task.split_files)}.")
    path = folder / task.folder / task.split_files[split]
    return Table(read_table(path, "tsv", list(task.headerless_columns) if task.headerless_columns else None), str(path))


def _label_key(value) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def label_names(data: DataSection, train: Table) -> list[str]:
    """The label set: the recipe's, else the GLUE task's, else the source's, else sorted from train."""
    if data.label_names:
        return list(data.label_names)
    if data.glue_task:
        return list(GLUE_TASKS[data.glue_task].label_names)
    if train.label_names:
        return train.label_names
    field = label_field(data)
    values = sorted({_label_key(row[field]) for row in train.rows if row.get(field) is not None})
    if values and all(v.lstrip("-").isdigit() for v in values):
        values = sorted(values, key=int)
    return values


def to_examples(data: DataSection, task: TaskSection, table: Table, names: list[str], max_samples: int | None
                ) -> Examples:
    fields = input_fields(data, task)
    label = label_field(data) if has_labels(task) else None
    target = label or task.target_field
    if not table.rows:
        raise UserError(f"{table.origin} has no rows. Give a file with a header row and at least one example.")
    columns = set(table.rows[0])
    missing = [c for c in [*fields, target] if c not in columns]
    if missing:
        fix = ("Name existing columns in task.template's {placeholders}" + (" and task.target_field" if label is None
               else " (and data.label_field)") if task.type == "causal_lm"
               else "Set data.text_fields / data.label_field")
        raise UserError(
            f"{table.origin} has no column(s) {', '.join(map(repr, missing))}; its columns are "
            f"{', '.join(map(repr, sorted(columns)))}. {fix} (or data.columns for a file without a header row)."
        )
    words = None
    if task.type == "causal_lm" and label is not None:
        try:
            words = label_word_list(task.label_words, names)
        except ValueError as err:
            raise UserError(str(err)) from None
    index = {name: i for i, name in enumerate(names)}
    # Integer labels index the label list when they are not themselves label names (GLUE's 0/1).
    numeric = not any(name.lstrip("-").isdigit() for name in names)
    rows = table.rows[:max_samples] if max_samples else table.rows
    examples = Examples([], [], [] if task.type == "causal_lm" else None)
    for number, row in enumerate(rows, 1):
        absent = [c for c in [*fields, target] if c not in row]
        if absent:
            raise UserError(f"row {number} of {table.origin} has no value for {', '.join(map(repr, absent))}. "
                            "Fix the row (every row needs the input and label/target fields).")
        values = tuple("" if row[f] is None else str(row[f]) for f in fields)
        examples.texts.append((render(task.template, fields, values),) if task.type == "causal_lm" else values)
        if label is None:
            examples.targets.append("" if row[target] is None else str(row[target]))
            continue
        key = _label_key(row[label])
        if key in index:
            examples.labels.append(index[key])
        elif numeric and key.isdigit() and int(key) < len(names):
            examples.labels.append(int(key))
        else:
            raise UserError(
                f"row {number} of {table.origin} has label {key!r}, which is not one of {names}. Fix the row, or "
                "list every label in data.label_names."
            )
        if words is not None:
            examples.targets.append(words[examples.labels[-1]])
    return examples


def load_split(data: DataSection, task: TaskSection, split: str, names: list[str]) -> Examples:
    """One split's examples, with the label names fixed (e.g. from a checkpoint).

    The recipe's eval split keeps its max_eval_samples, so that evaluating a checkpoint
    reproduces the metrics printed during training.
    """
    limit = data.max_eval_samples if split == data.eval_split else None
    return to_examples(data, task, read_split(data, split), names, limit)


def load_examples(data: DataSection, task: TaskSection | None = None) -> tuple[Examples, Examples, list[str]]:
    """Train and eval examples, and the label names (in id order; none for free-form targets).
    Without a task section: sequence classification."""
    task = task or TaskSection()
    train = read_split(data, data.train_split)
    evaluation = read_split(data, data.eval_split)
    names = label_names(data, train) if has_labels(task) else []
    if has_labels(task) and len(names) < 2:
        raise UserError(f"{train.origin} has fewer than two distinct labels ({names}); a classifier needs two.")
    return (
        to_examples(data, task, train, names, data.max_train_samples),
        to_examples(data, task, evaluation, names, data.max_eval_samples),
        names,
    )
