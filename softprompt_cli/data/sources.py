"""Reading examples from GLUE_DIR folders, local files, or the Hub; mapping labels to ids.

Local files are read without torch or transformers, so `softprompt validate` can check columns
and labels of the real data.
"""

from __future__ import annotations

import codecs
import csv
import io
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


def _file_format(path: Path, declared: str | None, recipe: bool = True) -> str:
    if declared:
        return declared
    suffix = path.suffix.lower().lstrip(".")
    formats = {"csv": "csv", "tsv": "tsv", "txt": "tsv", "jsonl": "jsonl", "json": "jsonl", "parquet": "parquet"}
    if suffix not in formats:
        if not recipe:
            raise UserError(f"cannot tell the format of {str(path)!r} from its extension: predict reads .csv, .tsv, "
                            ".jsonl and .parquet files. Save (or rename) the file with one of these extensions.")
        raise UserError(f"cannot tell the format of {str(path)!r} from its extension; set data.format "
                        "(csv, tsv, jsonl or parquet).")
    return formats[suffix]


def _check_file(path: Path, recipe: bool) -> None:
    kinds = "a .csv, .tsv, .jsonl or .parquet file"
    if path.is_dir():
        fix = (f"Name the file itself in the recipe's data.files (e.g. {str(path / 'train.csv')!r})." if recipe
               else f"Give {kinds} instead.")
        raise UserError(f"{'data file' if recipe else '--input'} {str(path)!r} is a folder, not a file. {fix}")
    if not path.is_file():
        if recipe:
            raise UserError(f"data file {str(path)!r} does not exist. Check the path in the recipe's data section.")
        raise UserError(f"--input {str(path)!r} does not exist. Give {kinds}.")


def _decode(path: Path, encoding: str, recipe: bool) -> str:
    """The file's text; a byte that is not `encoding` is reported with its line (a leading UTF-8 BOM is dropped)."""
    raw = path.read_bytes()
    utf8 = codecs.lookup(encoding).name == "utf-8"
    codec = "utf-8-sig" if utf8 else encoding
    try:
        return raw.decode(codec)
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        fix = ("Re-save the file as UTF-8, or set data.encoding to the encoding it was written in "
               "(e.g. data.encoding: latin-1)." if recipe else "Re-save the file as UTF-8 text.")
        raise UserError(f"{str(path)!r} is not {'UTF-8' if utf8 else encoding} text: byte {raw[err.start]:#04x} on "
                        f"line {line} cannot be decoded (a file saved as Latin-1 / Windows-1252, or not a text file "
                        f"at all). {fix}") from None


_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true/false"}


def _jsonl_rows(path: Path, text: str) -> list[dict]:
    rows = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{str(path)!r} line {number} is not valid JSON ({err.msg}).") from None
        if not isinstance(row, dict):
            raise UserError(f"{str(path)!r} line {number} is {_JSON_TYPES.get(type(row), 'null')}, not a JSON object: "
                            'each line must be one object such as {"text": "...", "label": "..."}. Fix that line.')
        rows.append(row)
    return rows


def _delimited_rows(path: Path, text: str, kind: str, columns: list[str] | None) -> list[dict]:
    """csv/tsv rows as dicts; quotes in tsv are text (GLUE)."""
    handle = io.StringIO(text, newline="")
    reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE) if kind == "tsv" else csv.reader(handle)
    try:
        lines = [(reader.line_num, line) for line in reader if line]
    except csv.Error as err:
        raise UserError(f"{str(path)!r} line {reader.line_num} cannot be read as {kind} ({err}). Fix that line, or "
                        "check that the file is really a text table.") from None
    header, body = (list(columns), lines) if columns else (lines[0][1] if lines else [], lines[1:])
    for number, line in body:  # zip would drop extra cells, or leave columns out, without a word
        if len(line) != len(header):
            fix = "quote a text that holds a comma" if kind == "csv" else "a text cannot hold a tab"
            raise UserError(f"{str(path)!r} line {number} has {len(line)} fields, but the {kind} has {len(header)} "
                            f"columns ({', '.join(header)}). Fix that line ({fix}).")
    return [dict(zip(header, line)) for _, line in body]


def _parquet_rows(path: Path) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as err:
        raise UserError(f"{str(path)!r} is not a readable parquet file ({err}). Export it again as parquet, or give "
                        "the data as a csv, tsv or jsonl file.") from None


def read_table(path: Path, file_format: str | None = None, columns: list[str] | None = None,
               encoding: str = "utf-8", recipe: bool = True) -> list[dict]:
    """Rows of a csv/tsv/jsonl/parquet file. csv/tsv values stay strings; quotes in tsv are text (GLUE).

    `encoding` applies to csv/tsv/jsonl. `recipe`: the file comes from a recipe's data section, so error
    messages may suggest data.format / data.encoding (predict's --input has no such settings)."""
    _check_file(path, recipe)
    kind = _file_format(path, file_format, recipe)
    if kind == "parquet":
        return _parquet_rows(path)
    text = _decode(path, encoding, recipe)
    return _jsonl_rows(path, text) if kind == "jsonl" else _delimited_rows(path, text, kind, columns)


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


def _read_source(data: DataSection, split: str) -> Table:
    """One split as the data source has it (no held-out part taken off)."""
    if data.files is not None:
        if split not in data.files:
            raise UserError(f"data.files has no {split!r} split; it has {', '.join(data.files)}.")
        path = Path(data.files[split]).expanduser()
        return Table(read_table(path, data.format, data.columns, data.encoding), str(path))
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
    rows = read_table(path, "tsv", list(task.headerless_columns) if task.headerless_columns else None)
    renamed = [(column, hub) for column, hub in zip(task.text_columns, task.hub_text_fields) if column != hub]
    for row in rows:  # the Hub's names too, so that a template reads {sentence1} whichever the source
        row.update({hub: row[column] for column, hub in renamed if column in row})
    return Table(rows, str(path))


def _hold_out(data: DataSection, table: Table) -> tuple[Table, Table]:
    """(train, held out): data.validation_fraction of the train rows, drawn with data.split_seed (the same seed
    and rows, the same split), each part in file order."""
    import random

    count, fraction = len(table.rows), data.validation_fraction
    held = round(fraction * count)
    if held < 1 or held >= count:
        raise UserError(f"{table.origin} has {count} row(s), and data.validation_fraction {fraction} holds out {held} "
                        "of them; both parts need at least one row. Use more training rows or a larger fraction.")
    chosen = set(random.Random(data.split_seed).sample(range(count), held))
    where = f"data.validation_fraction {fraction}, data.split_seed {data.split_seed}"
    return (Table([r for i, r in enumerate(table.rows) if i not in chosen],
                  f"{table.origin} (without the rows held out as {data.eval_split!r}: {where})", table.label_names),
            Table([r for i, r in enumerate(table.rows) if i in chosen],
                  f"{table.origin} (the rows held out as {data.eval_split!r}: {where})", table.label_names))


def read_split(data: DataSection, split: str) -> Table:
    """One split's rows. With data.validation_fraction, the train split loses its held-out rows, and the eval split
    is those rows."""
    if data.validation_fraction is None or split not in (data.train_split, data.eval_split):
        return _read_source(data, split)
    train, held = _hold_out(data, _read_source(data, data.train_split))
    return train if split == data.train_split else held


def _warn_if_choosing_on_test(data: DataSection) -> None:
    """One line on stderr (main process only) when the split that picks best/ is a test set by its name."""
    path = (data.files or {}).get(data.eval_split)
    if data.eval_split.lower() != "test" and not (path and Path(path).stem.lower() == "test"):
        return
    if os.environ.get("RANK", "0") != "0":
        return
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True).print(
        f"[bold yellow]warning:[/] eval split {escape(repr(data.eval_split))} looks like a test set "
        f"({escape(path or 'by its name')}), and the eval split chooses best/: its score is then optimistic. Set "
        "data.validation_fraction (e.g. 0.1) to hold out part of train instead, or point data.eval_split at a "
        "validation split.",
        highlight=False, soft_wrap=True)


def label_key(value) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _label_of(row: dict, field: str, number: int, origin: str) -> str:
    """The row's label as a key; an empty or null label cell is refused (it is not a class named '')."""
    key = "" if row[field] is None else label_key(row[field])
    if not key:
        raise UserError(f"row {number} of {origin} has an empty label (column {field!r}). Fill in its label, or "
                        "remove the row.")
    return key


def cell_text(value) -> str | None:
    """The text of a table cell: strings as they are, numbers as written; None for a cell that holds no text
    (null, empty, true/false, a list or an object)."""
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:  # not NaN
        return str(value)
    return None


def row_texts(row: dict, fields: list[str], number: int, origin: str) -> tuple[str, ...]:
    """The texts of one row's fields; a cell that holds no text is refused with the row number."""
    texts = []
    for name in fields:
        text = cell_text(row[name])
        if text is None:
            value = row[name]
            what = ("empty" if value is None or (isinstance(value, str) and not value.strip())
                    else f"{value!r} ({type(value).__name__})")
            raise UserError(f"row {number} of {origin}: field {name!r} is {what}, not a text. Fill in the text, or "
                            "remove the row.")
        texts.append(text)
    return tuple(texts)


def label_names(data: DataSection, train: Table) -> list[str]:
    """The label set: the recipe's, else the GLUE task's, else the source's, else sorted from train."""
    if data.label_names:
        return list(data.label_names)
    if data.glue_task:
        return list(GLUE_TASKS[data.glue_task].label_names)
    if train.label_names:
        return train.label_names
    field = label_field(data)  # a row without the column at all is reported by to_examples
    values = sorted({_label_of(row, field, n, train.origin) for n, row in enumerate(train.rows, 1) if field in row})
    if values and all(v.lstrip("-").isdecimal() for v in values):
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
    numeric = not any(name.lstrip("-").isdecimal() for name in names)
    rows = table.rows[:max_samples] if max_samples else table.rows
    examples = Examples([], [], [] if task.type == "causal_lm" else None)
    for number, row in enumerate(rows, 1):
        absent = [c for c in [*fields, target] if c not in row]
        if absent:
            raise UserError(f"row {number} of {table.origin} has no value for {', '.join(map(repr, absent))}. "
                            "Fix the row (every row needs the input and label/target fields).")
        values = row_texts(row, fields, number, table.origin)
        examples.texts.append((render(task.template, fields, values),) if task.type == "causal_lm" else values)
        if label is None:
            examples.targets.append(row_texts(row, [target], number, table.origin)[0])
            continue
        key = _label_of(row, label, number, table.origin)
        if key in index:
            examples.labels.append(index[key])
        elif numeric and key.isdecimal() and int(key) < len(names):
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
    full = train = _read_source(data, data.train_split)
    if data.validation_fraction is None:
        evaluation = _read_source(data, data.eval_split)
        _warn_if_choosing_on_test(data)
    else:
        train, evaluation = _hold_out(data, full)
    names = label_names(data, full) if has_labels(task) else []  # held-out rows' labels count too
    if has_labels(task) and len(names) < 2:
        raise UserError(f"{train.origin} has fewer than two distinct labels ({names}); a classifier needs two.")
    try:
        task.positive_index(names)  # an unknown positive_label is refused before training
    except ValueError as err:
        raise UserError(str(err)) from None
    return (
        to_examples(data, task, train, names, data.max_train_samples),
        to_examples(data, task, evaluation, names, data.max_eval_samples),
        names,
    )
