"""A GGUF model's dequantized copy: written as a plain float32 transformers folder (for softprompt_cli.gguf_cache),
and loaded from it so that it is what transformers gives for the GGUF file itself.

transformers dequantizes a GGUF file on every load (SmolLM2-135M: tens of seconds, 1.2 GB); model.loading does it
once.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from softprompt_cli import gguf_cache

GGUF_LOADER = "transformers.modeling_gguf_pytorch_utils"
"""The transformers module that dequantizes tensor by tensor, under a tqdm bar of its own."""


def note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def _tracker(name: str):
    """A stand-in for tqdm(iterable, desc=...) that shows our bar, on stderr, gone when done."""

    def track(iterable: Iterable, *args: Any, **kwargs: Any) -> Iterator:
        columns = (TextColumn(f"dequantizing {name}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
            yield from progress.track(iterable)

    return track


@contextlib.contextmanager
def dequantizing_progress(name: str) -> Iterator[None]:
    """Our progress bar in place of the one transformers prints while it dequantizes `name` (a plain tqdm bar,
    which transformers' own progress-bar switch does not reach)."""
    try:  # imported here, not at the top: it imports the gguf package, which only dequantizing needs
        module = importlib.import_module(GGUF_LOADER)
    except ImportError:
        module = None
    original = getattr(module, "tqdm", None)
    if original is None:  # another transformers layout: its bar, if any, stays
        yield
        return
    module.tqdm = _tracker(name)
    try:
        yield
    finally:
        module.tqdm = original


def save_dequantized(model: nn.Module, tokenizer: Any, folder: Path) -> dict[str, Any]:
    """Write a model loaded from a GGUF file (its weights dequantized to float32) and its tokenizer into `folder`
    as a plain transformers model folder; return what the entry's manifest keeps of the GGUF load."""
    quantization = model.config.to_dict().get("quantization_config")
    # Its weights are plain float32 tensors now: without its GGUF quantizer, which refuses to save, and the
    # quantization_config that would send the next load back to it, transformers saves it as any model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"quantization_config": quantization}


def as_loaded_from_gguf(loaded: Any, entry: Path) -> Any:
    """A model, config or tokenizer loaded from a cache entry, as the GGUF file itself gives it: a model's config
    has the quantization_config transformers records (a part of the fingerprint checkpoints keep of their base
    model); a config or tokenizer is the same either way."""
    quantization = (gguf_cache.read_manifest(entry) or {}).get("quantization_config")
    if isinstance(loaded, nn.Module) and quantization is not None:
        loaded.config.quantization_config = quantization
    return loaded
