"""Checkpoint folders: trainable tensors in safetensors, everything else in JSON/YAML; atomic writes.

    <dir>/softprompt.safetensors   prompt parameters (training form) and head
    <dir>/checkpoint.json          method, labels, base model id/revision/fingerprint, metrics
    <dir>/recipe.yaml              the fully resolved recipe
    <dir>/tokenizer files          only with output.save_tokenizer
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from softprompt_cli.errors import UserError

FORMAT_VERSION = 1
WEIGHTS_FILE = "softprompt.safetensors"
INFO_FILE = "checkpoint.json"
RECIPE_FILE = "recipe.yaml"
PREFIX_KEY = "prompt.tokens.embedding"
LOCK_FILE = ".softprompt.lock"
COMPLETE_MARKER = ".complete"
"""Written last (and fsynced) into a staging folder: only a staging folder that has it may replace its target."""


WRITE_ERRORS = (OSError, SafetensorError)
"""What writing a file can raise: safetensors reports its own I/O errors (disk full included) as SafetensorError."""

_ADVICE = {
    errno.ENOSPC: "Free disk space, or choose another output folder (output.dir, or -o).",
    errno.EDQUOT: "Free space within your disk quota, or choose another output folder (output.dir, or -o).",
    errno.EROFS: "The file system is read-only: choose an output folder (output.dir, or -o) on a writable one.",
    errno.EACCES: "Make the folder writable for you, or choose another output folder (output.dir, or -o).",
    errno.EPERM: "Make the folder writable for you, or choose another output folder (output.dir, or -o).",
    errno.ENOTDIR: "A part of the path is a file, not a folder: choose another output folder (output.dir, or -o).",
    errno.EEXIST: "A file stands where a folder is needed: choose another output folder (output.dir, or -o).",
}


def disk_error(path: Path, err: Exception, kept: str) -> UserError:
    """A UserError for an error met while writing `path` (disk full, quota, read-only, permissions, a file in
    the way); `kept` says what is still intact."""
    number = getattr(err, "errno", None) or (errno.ENOSPC if "os error 28" in str(err) else None)
    code = errno.errorcode.get(number, "") if number else ""
    reason = f"{getattr(err, 'strerror', None) or err}{f' ({code})' if code else ''}"
    advice = _ADVICE.get(number, "Free disk space or make the folder writable, or choose another output folder "
                                 "(output.dir, or -o).")
    return UserError(f"could not write {str(path)!r}: {reason}. {kept} {advice} (A training run continues from "
                     "its last saved state with --resume.)")


def _fsync_file(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_folder(folder: Path) -> None:
    """Make the folder's entries (created, renamed, removed names) durable; a file's fsync does not."""
    _fsync_file(folder)  # an O_RDONLY descriptor of a directory can be fsynced on Linux


def _seal(staging: Path) -> None:
    """Flush every file of a filled staging folder to disk, then mark it complete (marker last, fsynced)."""
    entries = sorted(staging.rglob("*"))
    for path in entries:
        if path.is_file():
            _fsync_file(path)
    folders = [p for p in entries if p.is_dir()] + [staging]
    for folder in folders:  # every file's name is durable before the marker says the folder is complete
        fsync_folder(folder)
    marker = staging / COMPLETE_MARKER
    marker.write_text("complete\n")
    _fsync_file(marker)
    fsync_folder(staging)


def _retired(directory: Path) -> Path:
    return directory.with_name(f".{directory.name}.old")


def _staging_folders(directory: Path) -> list[Path]:
    """Staging folders of `directory` left by writers: `.NAME.XXXXXXXX.tmp`. The suffix keeps a user's own hidden
    folders out of it (staging folders of versions before it, without .tmp, are left alone for that reason)."""
    pattern = re.compile(rf"\.{re.escape(directory.name)}\.[^./]+\.tmp")
    return [p for p in directory.parent.iterdir() if p.is_dir() and pattern.fullmatch(p.name)]


def recover_folder(directory: Path) -> None:
    """Finish or undo a replacement of `directory` that a crash interrupted, and clean up after writers.

    A replacement renames `directory` to `.NAME.old`, then the complete staging folder to `directory`; a
    crash between the two leaves no `directory`. Then the newest complete staging folder is put in place
    (the write had committed), else `.NAME.old` (the previous version). Once `directory` exists, staging
    folders (unfinished or never installed writes) and `.NAME.old` are removed."""
    if not directory.parent.is_dir():
        return
    staging = _staging_folders(directory)
    retired = _retired(directory)
    if not directory.exists():
        complete = [p for p in staging if (p / COMPLETE_MARKER).is_file()]
        newest = max(complete, key=lambda p: ((p / COMPLETE_MARKER).stat().st_mtime_ns, p.name), default=None)
        source = newest or (retired if retired.is_dir() else None)
        if source is None:
            return
        source.rename(directory)
        fsync_folder(directory.parent)
    for leftover in [*staging, retired]:
        if leftover.exists() and leftover != directory:
            shutil.rmtree(leftover, ignore_errors=True)


def _install(staging: Path, directory: Path) -> None:
    """Put a sealed staging folder in the place of `directory`; recover_folder completes it after a crash."""
    retired = _retired(directory)
    if directory.exists():
        shutil.rmtree(retired, ignore_errors=True)
        directory.rename(retired)
    staging.rename(directory)
    (directory / COMPLETE_MARKER).unlink()  # the marker matters only in staging folders
    fsync_folder(directory)
    fsync_folder(directory.parent)
    shutil.rmtree(retired, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(directory: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; it then replaces `directory` by rename.

    A crash while writing never leaves a half-written folder where a good one stood, and a crash while
    replacing is undone or completed by recover_folder (run here first, and before state is read). Every
    file and folder is fsynced before the renames, the parent after them. An OSError (disk full, read-only,
    permissions) becomes a UserError, with `directory` as it was and the staging folder removed."""
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        recover_folder(directory)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    except OSError as err:
        raise disk_error(directory, err, "Nothing was changed.") from None
    try:
        yield staging
        _seal(staging)
        _install(staging, directory)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        with contextlib.suppress(OSError):
            recover_folder(directory)  # puts the previous version back if the replacement had begun
        if isinstance(err, WRITE_ERRORS):
            raise disk_error(directory, err, "The folder still holds what it held before.") from None
        raise


def write_small_file(path: Path, text: str) -> None:
    """Write a small text file (a recipe, a summary) into a run's folder; a write error is a UserError."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as err:
        raise disk_error(path, err, "The run's checkpoints and state are kept.") from None


def refuse_non_finite(directory: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Never write NaN or infinite weights: they would load fine and predict garbage."""
    bad = [name for name, tensor in tensors.items()
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor.detach()).all())]
    if bad:
        shown = ", ".join(sorted(bad)[:3]) + (", ..." if len(bad) > 3 else "")
        raise UserError(f"refusing to write {str(directory)!r}: {shown} hold NaN or infinite values, so training "
                        "diverged. Lower training.lr (with mixed_precision fp16, use bf16 or no) and train again; "
                        "the folder keeps what it held before.")


def write_checkpoint(directory: Path, tensors: dict[str, torch.Tensor], info: dict[str, Any], recipe_yaml: str,
                     tokenizer=None) -> int:
    """Write a checkpoint folder atomically; return the size of its weights file in bytes."""
    refuse_non_finite(directory, tensors)
    with atomic_folder(directory) as staging:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, staging / WEIGHTS_FILE,
                  metadata={"format": "pt"})
        (staging / INFO_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION, **info}, indent=2) + "\n")
        (staging / RECIPE_FILE).write_text(recipe_yaml)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return (directory / WEIGHTS_FILE).stat().st_size


RETRAIN = ("Use another checkpoint (the run's other best/ or final/ folder), or train again (softprompt train "
           "RECIPE).")


def damaged_checkpoint(directory: Path, what: str, fix: str = RETRAIN) -> UserError:
    """The one error for a checkpoint (or PEFT adapter) that is not what it should be: `what` is wrong, `fix`
    what to do. Raise it: `raise damaged_checkpoint(...) from None`."""
    what = " ".join(str(what).split())  # one paragraph, whatever the underlying error printed
    return UserError(f"checkpoint {str(directory)!r} is damaged: {what}. {fix}")


def _info_problem(info: Any) -> str | None:
    """What is wrong with the contents of a checkpoint.json, or None."""
    if not isinstance(info, dict):
        return f"{INFO_FILE} holds a JSON {type(info).__name__}, not an object"
    labels, base = info.get("label_names"), info.get("base_model")
    if not isinstance(labels, list) or not all(isinstance(name, str) for name in labels):
        return f"{INFO_FILE} has no label_names (a list of label names)"
    if not isinstance(base, dict) or not all(isinstance(base.get(k), str) for k in ("name_or_path", "fingerprint")):
        return f"{INFO_FILE} has no base_model (with name_or_path and fingerprint)"
    return None


def read_checkpoint(directory: Path) -> tuple[dict[str, Any], str, dict[str, torch.Tensor]]:
    """(info, recipe YAML, tensors) of a checkpoint folder; never unpickles anything. The info is checked to
    hold label_names and base_model; the recipe is the caller's to parse."""
    if not directory.exists() and directory.parent.is_dir():
        with contextlib.suppress(*WRITE_ERRORS):
            recover_folder(directory)  # a crash between the renames of a replacement left it elsewhere
    if not directory.is_dir():
        raise UserError(f"checkpoint folder {str(directory)!r} does not exist. Give a folder written by "
                        "`softprompt train` (e.g. runs/<recipe>/best).")
    missing = [name for name in (WEIGHTS_FILE, INFO_FILE, RECIPE_FILE) if not (directory / name).is_file()]
    if len(missing) == 3:
        raise UserError(f"{str(directory)!r} is not a checkpoint folder (it has no {', '.join(missing)}). Give a "
                        "best/ or final/ folder written by `softprompt train` (e.g. runs/<recipe>/best).")
    if missing:
        raise damaged_checkpoint(directory, f"it is incomplete ({', '.join(missing)} missing)")
    try:
        info = json.loads((directory / INFO_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # UnicodeDecodeError is a ValueError too
        raise damaged_checkpoint(directory, f"{INFO_FILE} is not valid JSON ({err})") from None
    problem = _info_problem(info)
    if problem:
        raise damaged_checkpoint(directory, problem)
    try:
        recipe_yaml = (directory / RECIPE_FILE).read_text(encoding="utf-8")
    except (OSError, ValueError) as err:
        raise damaged_checkpoint(directory, f"{RECIPE_FILE} cannot be read ({err})") from None
    return info, recipe_yaml, read_weights(directory, WEIGHTS_FILE)


def read_weights(directory: Path, name: str, fix: str = RETRAIN) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file in a checkpoint folder; a truncated or garbled file is damage."""
    try:
        return load_file(directory / name)
    except Exception as err:  # I/O and safetensors' own errors (truncated header or data) alike
        raise damaged_checkpoint(directory, f"{name} cannot be read ({err})", fix) from None


def refuse_earlier_output(out: Path, overwrite: bool, fix: str, run_files: tuple[str, ...] | None = None) -> None:
    """Refuse to write into a folder that holds earlier results (any file, or one of `run_files`) unless
    `overwrite`; `fix` says how to choose another folder or allow it."""
    if overwrite or not out.is_dir():
        return
    # The lock file is the current run's own claim (output_lock), not an earlier result.
    earlier = sorted(p.name for p in out.iterdir()
                     if p.name != LOCK_FILE and (run_files is None or p.name in run_files))
    if earlier:
        shown = ", ".join(earlier[:5]) + (", ..." if len(earlier) > 5 else "")
        holds = "is not empty" if run_files is None else "already holds a run"
        raise UserError(f"output folder {str(out)!r} {holds} ({shown}). {fix}")


def _lock_holder(descriptor: int) -> str:
    """The pid the holder wrote into the lock file (it may not have written it yet)."""
    try:
        text = os.pread(descriptor, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "pid unknown"


def _take_lock(path: Path) -> int:
    """An open descriptor of `path` holding its exclusive flock; UserError if another process holds it."""
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(descriptor)
            os.close(descriptor)
            raise UserError(f"output folder {str(path.parent)!r} is in use by another softprompt run ({holder}); "
                            "wait for it to finish, or choose another output.dir (-o for other commands).") from None
        # The previous holder removes the file as it releases it: a lock on a removed file claims nothing.
        try:
            same = os.path.samestat(os.fstat(descriptor), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(descriptor, 0)
            os.write(descriptor, f"{os.getpid()}\n".encode())
            return descriptor
        os.close(descriptor)


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive claim on the output folder `out` (created if missing) while the block runs, so
    that two runs never write into one folder. The claim is a flock on `out/.softprompt.lock`: the kernel
    drops it when the process ends however it ends (a killed run never leaves it stuck). The file is
    removed on release, and so is `out` if this claim created it and nothing was written."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output folder {str(out)!r} is a file, not a folder. Choose another output folder, or move "
                        "the file away.")
    created = not out.exists()
    path = out / LOCK_FILE
    try:
        out.mkdir(parents=True, exist_ok=True)
        descriptor = _take_lock(path)
    except OSError as err:
        raise disk_error(out, err, "Nothing was written.") from None
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # while still held, so that no one locks a file about to vanish
        os.close(descriptor)  # releases the flock
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if empty


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
    fix = ("Make the prefix again (softprompt init-prefix-from-text), or point method.init_checkpoint at another "
           "checkpoint.")
    try:
        info = json.loads((directory / INFO_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise damaged_checkpoint(directory, f"{INFO_FILE} is not valid JSON ({err})", fix) from None
    base = info.get("base_model") if isinstance(info, dict) else None
    if not isinstance(base, dict) or not all(isinstance(base.get(k), str) for k in ("name_or_path", "fingerprint")):
        raise damaged_checkpoint(directory, f"{INFO_FILE} has no base_model (with name_or_path and fingerprint)", fix)
    if base["fingerprint"] != fingerprint:
        raise UserError(f"method.init_checkpoint {str(directory)!r} was made for {base['name_or_path']!r}"
                        ", a different model. Make the prefix with the recipe's model.")
    prefix = read_weights(directory, WEIGHTS_FILE, fix).get(PREFIX_KEY)
    if prefix is None or tuple(prefix.shape) != (num_virtual_tokens, width):
        shape = None if prefix is None else tuple(prefix.shape)
        raise UserError(f"method.init_checkpoint {str(directory)!r} holds a prefix of shape {shape}, not "
                        f"{(num_virtual_tokens, width)}: set method.num_virtual_tokens to match it (and "
                        "projection: false).")
    return prefix
