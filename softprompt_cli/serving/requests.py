"""What the HTTP side hands the engine, and how the engine answers: each request carries the event loop it came
from, and the engine (another thread) replies through that loop only."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from softprompt_cli.inference.batches import Item
from softprompt_cli.inference.tasks import Task
from softprompt_cli.model.lm import Sampling
from softprompt_cli.serving.text import TextStream

_numbers = itertools.count()


def _post(loop: asyncio.AbstractEventLoop, callback, *args) -> None:
    """Run `callback(*args)` on `loop`'s thread; a loop already closed (server stopping) is ignored."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        pass


@dataclass
class Request:
    loop: asyncio.AbstractEventLoop
    number: int = field(default_factory=lambda: next(_numbers), init=False)
    arrived: float = field(default_factory=time.monotonic, init=False)
    cancelled: bool = field(default=False, init=False)
    """Set by the HTTP side when the client is gone: the engine drops the request at its next step."""
    released: bool = field(default=False, init=False)
    """The engine no longer counts it as waiting."""


@dataclass
class Classification(Request):
    """Inputs to classify with one task: answered with each item's probabilities, in order."""

    items: list[Item] = field(default_factory=list)
    future: asyncio.Future = field(default=None)  # type: ignore[assignment]
    results: list[Any] = field(default_factory=list, init=False)
    remaining: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.results = [None] * len(self.items)
        self.remaining = len(self.items)

    def answer(self, index: int, probabilities: torch.Tensor) -> None:
        self.results[index] = probabilities
        self.remaining -= 1
        if self.remaining == 0:
            _post(self.loop, _settle, self.future, self.results, None)

    def fail(self, error: Exception) -> None:
        _post(self.loop, _settle, self.future, None, error)


def _settle(future: asyncio.Future, result: Any, error: Exception | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


@dataclass
class Completion(Request):
    """A text to continue with one soft prompt (task None: the base model alone). The engine puts events on
    `events`: ("text", delta) as tokens come, then ("done", finish_reason) or ("error", exception)."""

    task: Task | None = None
    input_ids: list[int] = field(default_factory=list)
    stream: TextStream = field(default=None)  # type: ignore[assignment]
    sampling: Sampling | None = None
    events: asyncio.Queue = field(default=None)  # type: ignore[assignment]
    model_name: str = ""
    """The name the request gave (a soft prompt's or the base model's)."""

    def emit(self, delta: str) -> None:
        if delta:
            _post(self.loop, self.events.put_nowait, ("text", delta))
        if self.stream.finish_reason is not None:
            _post(self.loop, self.events.put_nowait, ("done", self.stream.finish_reason))

    def fail(self, error: Exception) -> None:
        _post(self.loop, self.events.put_nowait, ("error", error))

    @property
    def prompt(self) -> torch.Tensor | None:
        return None if self.task is None else self.task.prompt

    @property
    def prompt_kind(self) -> tuple:
        """Rows whose prompts can be run in one prefill: the same kind and length (None: no prompt)."""
        if self.task is None:
            return ("input", 0)
        return (self.task.model.kind, self.task.model.num_virtual_tokens)
