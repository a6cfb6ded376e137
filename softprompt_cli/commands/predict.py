"""`softprompt predict`: one frozen model, several trained soft prompts, rows of different tasks in
the same forward batch (see softprompt_cli.inference), written as jsonl, csv or tsv."""

from __future__ import annotations

import base64
import csv
import json
import sys
from pathlib import Path
from typing import Any

import torch

from softprompt_cli import precision
from softprompt_cli.commands.arguments import check_precision_option, check_predict_input
from softprompt_cli.data.sources import read_table
from softprompt_cli.devices import inference_device
from softprompt_cli.errors import UserError
from softprompt_cli.inference.batches import Generation, Item, label_record, make_items, predict
from softprompt_cli.inference.tasks import load_tasks

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
            prediction.update({OUTPUT_PREFIX + k: v for k, v in label_record(item.task.label_names, p).items()})
        out.append({**rows[item.row], **prediction})
    return out


def _as_text(value: Any) -> Any:
    """An input value JSON has no type for (a parquet timestamp, date, bytes, decimal) as text."""
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return "base64:" + base64.b64encode(value).decode("ascii")
    return str(value)


def _plain(value: Any) -> Any:
    return value if value is None or isinstance(value, str | int | float | bool) else _as_text(value)


_TSV_BREAKS = str.maketrans({"\t": " ", "\n": " ", "\r": " "})


def _tsv_cell(value: Any) -> Any:
    """tsv is read back with quotes as text (GLUE's way), so it is written unquoted: a tab or line break inside a
    text would split its row and becomes a space."""
    return value.replace("\r\n", " ").translate(_TSV_BREAKS) if isinstance(value, str) else value


def _write_table(flat: list[dict], output: Path) -> None:
    columns = list(dict.fromkeys(k for r in flat for k in r))
    tsv = output.suffix.lower() == ".tsv"
    rows = [{k: _plain(v) for k, v in r.items()} for r in flat]
    changed = 0
    if tsv:
        cells = [{k: _tsv_cell(v) for k, v in r.items()} for r in rows]
        changed = sum(a != b for row, cell in zip(rows, cells) for a, b in zip(row.values(), cell.values()))
        rows = cells
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", newline="", encoding="utf-8") as handle:
        options = {"delimiter": "\t", "quoting": csv.QUOTE_NONE, "quotechar": None} if tsv else {}
        writer = csv.DictWriter(handle, columns, **options)
        writer.writeheader()
        writer.writerows(rows)
    if changed:
        print(f"note: {changed} text(s) held tabs or line breaks, written to {str(output)!r} as spaces (tsv has "
              "no quoting here); write .jsonl or .csv to keep them.", file=sys.stderr)


def write_records(results: list[dict], output: Path | None) -> None:
    if output is None or output.suffix.lower() in (".jsonl", ".json"):
        lines = "".join(json.dumps(r, ensure_ascii=False, default=_as_text) + "\n" for r in results)
        if output is None:
            sys.stdout.write(lines)
        else:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(lines, encoding="utf-8")
        return
    if output.suffix.lower() not in (".csv", ".tsv"):
        raise UserError(f"--output {str(output)!r}: write .jsonl, .csv or .tsv.")
    _write_table([{**{k: v for k, v in r.items() if k != "pred_probabilities"},
                   **{f"pred_p_{name}": v for name, v in r.get("pred_probabilities", {}).items()}} for r in results],
                 output)


def run_predict(references: list[str], input_file: Path | None, texts: list[str], text_pairs: list[str],
                output: Path | None, task_column: str, fields_override: list[str] | None, batch_size: int,
                model_path: str | None, generation: Generation | None = None, task: str | None = None,
                precision_option: str = "checkpoint", device_option: str = "auto") -> list[dict]:
    check_predict_input(input_file, texts, text_pairs)
    check_precision_option(precision_option)
    if input_file is not None:
        rows = read_table(input_file, recipe=False)
    else:
        fields_override = ["text", "text_pair"] if text_pairs else ["text"]
        rows = [{"text": t, **({"text_pair": p} if text_pairs else {})}
                for t, p in zip(texts, text_pairs or texts)]
    if not rows:  # before loading any model
        raise UserError("the input has no rows. Give at least one text.")
    check_input_columns(rows)
    tasks, tokenizer = load_tasks(references, model_path, precision_option, inference_device(device_option))
    notes = {precision.emulation_note(precision_option, task.precision, task.device)
             for task in tasks.values()}
    for note in sorted(notes - {None}):
        print(f"note: {note}", file=sys.stderr)
    items = make_items(rows, tasks, tokenizer, task_column, fields_override,
                       repr(str(input_file)) if input_file is not None else "the --text arguments", task)
    outputs = predict(items, tokenizer, batch_size, progress=len(items) > 1000 and output is not None,
                      generation=generation)
    results = records(rows, items, outputs)
    write_records(results, output)
    return results
