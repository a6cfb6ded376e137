"""Checkpoint folders: trainable tensors in safetensors, everything else in JSON/YAML; atomic writes.

    <dir>/softprompt.safetensors   prompt parameters (training form) and head
    <dir>/checkpoint.json          method, labels, base model id/revision/fingerprint, metrics
    <dir>/recipe.yaml              the fully resolved recipe
    <dir>/tokenizer files          only with output.save_tokenizer
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file

from softprompt_cli.errors import UserError

FORMAT_VERSION = 1
WEIGHTS_FILE = "softprompt.safetensors"
INFO_FILE = "checkpoint.json"
RECIPE_FILE = "recipe.yaml"


@contextlib.contextmanager
def atomic_folder(directory: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; it then replaces `directory` by rename.

    A crash while writing never leaves a half-written folder where a good one stood.
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        yield staging
        retired = None
        if directory.exists():
            retired = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(retired, ignore_errors=True)
            directory.rename(retired)
        staging.rename(directory)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_checkpoint(directory: Path, tensors: dict[str, torch.Tensor], info: dict[str, Any], recipe_yaml: str,
                     tokenizer=None) -> int:
    """Write a checkpoint folder atomically; return the size of its weights file in bytes."""
    with atomic_folder(directory) as staging:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, staging / WEIGHTS_FILE,
                  metadata={"format": "pt"})
        (staging / INFO_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION, **info}, indent=2) + "\n")
        (staging / RECIPE_FILE).write_text(recipe_yaml)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return (directory / WEIGHTS_FILE).stat().st_size


def read_checkpoint(directory: Path) -> tuple[dict[str, Any], str, dict[str, torch.Tensor]]:
    """(info, recipe YAML, tensors) of a checkpoint folder; never unpickles anything."""
    if not directory.is_dir():
        raise UserError(f"checkpoint folder {str(directory)!r} does not exist. Give a folder written by "
                        "`softprompt train` (e.g. runs/<recipe>/best).")
    missing = [name for name in (WEIGHTS_FILE, INFO_FILE, RECIPE_FILE) if not (directory / name).is_file()]
    if missing:
        raise UserError(f"checkpoint folder {str(directory)!r} is incomplete: {', '.join(missing)} missing. "
                        "Use a complete best/ or final/ folder from a training run.")
    try:
        info = json.loads((directory / INFO_FILE).read_text())
        tensors = load_file(directory / WEIGHTS_FILE)
    except Exception as err:  # JSON, I/O and safetensors' own errors all mean a damaged folder
        raise UserError(f"checkpoint folder {str(directory)!r} is damaged ({err}). Use another checkpoint.") from None
    return info, (directory / RECIPE_FILE).read_text(), tensors
