"""metrics.jsonl (one JSON line per log step and per evaluation) and the trackers, written by the main process."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from softprompt_cli.artifacts.checkpoint import disk_error


def finite_or_null(value: Any) -> Any:
    """`value` with every NaN or infinite float (at any depth) replaced by None: JSON has no such numbers, and
    Python's `NaN` tokens make a line that strict JSON readers reject."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    return value


def _lines_until(path: Path, step: int) -> list[str]:
    """The lines a resumed run keeps: those up to its step. A line cut short by a killed run is dropped."""
    if not path.exists():
        return []
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    return kept


def _replace_text(path: Path, text: str) -> None:
    """Write `text` to a sibling file and rename it over `path`: a crash or a full disk leaves the old file."""
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(text, encoding="utf-8")
    os.replace(staging, path)


class MetricsLog:
    """Appends records to metrics.jsonl and to accelerate's trackers; closes the file however the run ends.

    `keep_until`: a resumed run keeps the lines up to its step and drops what the stopped run logged later."""

    def __init__(self, path: Path, accelerator: Accelerator, keep_until: int | None = None):
        self.path = path
        self.accelerator = accelerator
        self.keep_until = keep_until
        self.file = None

    def __enter__(self) -> MetricsLog:
        if self.accelerator.is_main_process:
            kept = _lines_until(self.path, self.keep_until) if self.keep_until is not None else []
            try:
                _replace_text(self.path, "".join(line + "\n" for line in kept))
                self.file = self.path.open("a")
            except OSError as err:
                raise disk_error(self.path, err, "The earlier lines are kept.") from None
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def write(self, record: dict) -> None:
        if self.file is None:
            return
        record = finite_or_null(record)
        try:
            self.file.write(json.dumps(record, allow_nan=False) + "\n")
            self.file.flush()
        except OSError as err:
            raise disk_error(self.path, err, "The lines written before are kept.") from None
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        evaluated = {f"eval/{k}": v for k, v in record.get("eval", {}).items() if isinstance(v, (int, float))}
        self.accelerator.log(numbers | evaluated, step=record["step"])
