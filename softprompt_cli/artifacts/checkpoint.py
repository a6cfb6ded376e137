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
PREFIX_KEY = "prompt.tokens.embedding"


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


def refuse_earlier_output(out: Path, overwrite: bool, fix: str, run_files: tuple[str, ...] | None = None) -> None:
    """Refuse to write into a folder that holds earlier results (any file, or one of `run_files`) unless
    `overwrite`; `fix` says how to choose another folder or allow it."""
    if overwrite or not out.is_dir():
        return
    earlier = sorted(p.name for p in out.iterdir() if run_files is None or p.name in run_files)
    if earlier:
        shown = ", ".join(earlier[:5]) + (", ..." if len(earlier) > 5 else "")
        holds = "is not empty" if run_files is None else "already holds a run"
        raise UserError(f"output folder {str(out)!r} {holds} ({shown}). {fix}")


def write_prefix_checkpoint(out: Path, prefix: torch.Tensor, model_name: str, revision: str | None,
                            fingerprint: str, text: str) -> None:
    info = {"format_version": 1, "kind": "prefix_init",
            "method": {"name": "prefix_tuning", "num_virtual_tokens": prefix.shape[0], "projection": False},
            "base_model": {"name_or_path": model_name, "revision": revision, "fingerprint": fingerprint},
            "source_text": text}
    with atomic_folder(out) as staging:
        save_file({PREFIX_KEY: prefix.contiguous()}, staging / WEIGHTS_FILE, metadata={"format": "pt"})
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


def read_prefix_checkpoint(directory: Path, num_virtual_tokens: int, width: int, fingerprint: str) -> torch.Tensor:
    """The prefix of a prefix-tuning checkpoint (from init-prefix-from-text or training), checked against
    the model and method it is to start."""
    if not (directory / WEIGHTS_FILE).is_file() or not (directory / INFO_FILE).is_file():
        raise UserError(f"method.init_checkpoint {str(directory)!r} is not a checkpoint folder (it needs "
                        f"{WEIGHTS_FILE} and {INFO_FILE}); make one with softprompt init-prefix-from-text.")
    info = json.loads((directory / INFO_FILE).read_text())
    if info["base_model"]["fingerprint"] != fingerprint:
        raise UserError(f"method.init_checkpoint {str(directory)!r} was made for {info['base_model']['name_or_path']!r}"
                        ", a different model. Make the prefix with the recipe's model.")
    prefix = load_file(directory / WEIGHTS_FILE).get(PREFIX_KEY)
    if prefix is None or tuple(prefix.shape) != (num_virtual_tokens, width):
        shape = None if prefix is None else tuple(prefix.shape)
        raise UserError(f"method.init_checkpoint {str(directory)!r} holds a prefix of shape {shape}, not "
                        f"{(num_virtual_tokens, width)}: set method.num_virtual_tokens to match it (and "
                        "projection: false).")
    return prefix
