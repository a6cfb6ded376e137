"""The cache of dequantized GGUF models: each GGUF file, once dequantized, is kept as a plain transformers folder
(config, float32 safetensors, tokenizer) that later runs load in seconds, memory-mapped.

    <HF_HOME>/softprompt/gguf/                (HF_HOME defaults to $XDG_CACHE_HOME/huggingface, ~/.cache/huggingface)
        <file stem>-<key>/                    one entry: config.json, model.safetensors, tokenizer files, MANIFEST
        .partial-<key>-<random>/              an entry being written; renamed into place when complete
        .<key>.lock                           held while an entry is written, so one process writes it

An entry's key hashes what its content depends on: the GGUF file's resolved path, size and modification time, and
the versions of the code that dequantizes it (transformers, gguf). A changed file gets a new entry (and the entry of
its old content is removed); a damaged entry (a file missing or of another size than written, a safetensors file
that does not parse) is found before it is used, removed and written again.

Imports no torch, so `softprompt cache list` and `clear` start fast; the loader (model.loading) writes entries.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.metadata
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "softprompt-gguf.json"
"""Written last into an entry: what it was made from, and the size of every file in it."""
FORMAT = 1
"""The entry layout; a new layout gets new keys, so entries of an older one are never read."""
PARTIAL_PREFIX = ".partial-"
DEQUANTIZING_PACKAGES = ("transformers", "gguf")


def softprompt_cache_home() -> Path:
    """softprompt's folder under HF_HOME, found as the Hugging Face tools find it."""
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    home = os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")
    return Path(home).expanduser() / "softprompt"


def cache_dir() -> Path:
    """Where entries live."""
    return softprompt_cache_home() / "gguf"


@functools.cache  # an installed version does not change while a process runs
def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


@dataclass(frozen=True)
class GgufSource:
    """A GGUF file as the cache identifies it."""

    path: Path
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> GgufSource:
        resolved = path.resolve()
        stat = resolved.stat()
        return cls(resolved, stat.st_size, stat.st_mtime_ns)

    def identity(self) -> dict[str, Any]:
        versions = {name: _package_version(name) for name in DEQUANTIZING_PACKAGES}
        return {"format": FORMAT, "path": str(self.path), "size": self.size, "mtime_ns": self.mtime_ns,
                "versions": versions}

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def entry(self) -> Path:
        return cache_dir() / f"{self.path.stem}-{self.key}"


def read_manifest(entry: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file cannot be whole (its header does not parse, or its data does not end where the
    file does), read from its header alone."""
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > path.stat().st_size:
                return f"{path.name} has a header longer than the file"
            header = json.loads(handle.read(length))
        end = max((t["data_offsets"][1] for name, t in header.items() if name != "__metadata__"), default=0)
    except (OSError, ValueError, struct.error, KeyError, TypeError, IndexError) as err:
        return f"{path.name} is not a safetensors file ({err})"
    if 8 + length + end != path.stat().st_size:
        return f"{path.name} holds {path.stat().st_size} bytes, its header describes {8 + length + end}"
    return None


def entry_problem(entry: Path) -> str | None:
    """Why `entry` cannot be used (a manifest missing or unreadable, a file missing or not of the size written, a
    safetensors file that does not parse), or None when it looks whole."""
    manifest = read_manifest(entry)
    if manifest is None or not isinstance(manifest.get("files"), dict):
        return f"{MANIFEST} is missing or unreadable"
    for name, size in manifest["files"].items():
        path = entry / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} holds {path.stat().st_size} bytes, {size} were written"
        if name.endswith(".safetensors") and (problem := _safetensors_problem(path)):
            return problem
    return None


@contextlib.contextmanager
def writing_lock(source: GgufSource) -> Iterator[None]:
    """Held while the entry of `source` is checked and written: a second process waits, then finds it written."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / f".{source.key}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def draft(source: GgufSource) -> Iterator[Path]:
    """A new partial folder to write the entry of `source` into (hold `writing_lock`); removed unless published.

    Partial folders of this key are leftovers of a process that stopped while writing (the lock is ours): removed."""
    for leftover in cache_dir().glob(f"{PARTIAL_PREFIX}{source.key}-*"):
        remove(leftover)
    folder = Path(tempfile.mkdtemp(prefix=f"{PARTIAL_PREFIX}{source.key}-", dir=cache_dir()))
    folder.chmod(0o755)  # mkdtemp's folder is private; an entry is readable as the rest of the Hugging Face cache
    try:
        yield folder
    finally:
        remove(folder)


def publish(source: GgufSource, folder: Path, extra: dict[str, Any]) -> Path:
    """Make the written `folder` the entry of `source` (hold `writing_lock`): its manifest last, then one rename,
    so that an entry is there whole or not at all."""
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    manifest = {**source.identity(), "files": files, **extra}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    remove(source.entry)  # a damaged entry, already reported by the caller
    os.rename(folder, source.entry)
    _remove_earlier_content(source)
    return source.entry


def _remove_earlier_content(source: GgufSource) -> None:
    """Remove the entries of the same file as it was before it changed: nothing would load them again. (Entries of
    the same content made by other transformers or gguf versions stay: another installation may use them.)"""
    for entry in entries():
        manifest = read_manifest(entry) or {}
        earlier = (manifest.get("size"), manifest.get("mtime_ns")) != (source.size, source.mtime_ns)
        if manifest.get("path") == str(source.path) and earlier:
            remove(entry)


def entries() -> list[Path]:
    """The entries in the cache, written or damaged (not the partial folders)."""
    if not cache_dir().is_dir():
        return []
    return sorted(p for p in cache_dir().iterdir() if p.is_dir() and not p.name.startswith("."))


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@dataclass(frozen=True)
class EntryStatus:
    """One entry, as `softprompt cache list` shows it."""

    folder: Path
    source: str
    size: int
    problem: str | None
    """Why it cannot be used (it is written again when next needed), or None."""
    current: bool
    """Whether this installation would use it: its GGUF file is unchanged, and so are transformers and gguf."""


def status(entry: Path) -> EntryStatus:
    source = Path(str((read_manifest(entry) or {}).get("path", "?")))
    try:
        current = GgufSource.of(source).entry == entry
    except OSError:  # the GGUF file is gone
        current = False
    return EntryStatus(entry, str(source), folder_size(entry), entry_problem(entry), current)


def clear() -> tuple[int, int]:
    """Remove every entry and partial folder; (entries removed, bytes freed)."""
    removed = entries()
    freed = folder_size(cache_dir()) if cache_dir().is_dir() else 0
    remove(cache_dir())
    return len(removed), freed
