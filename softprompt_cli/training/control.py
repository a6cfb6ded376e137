"""Ending a run cleanly: Ctrl-C at a step boundary, agreed by every process, and the process group's teardown."""

from __future__ import annotations

import signal
import threading
import time

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState


class StopRequest:
    """Turns the first Ctrl-C into a request to stop at the next step boundary (where the state
    is consistent and can be saved); a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class TrainingStopped(Exception):
    """Raised after a requested stop, once the state is saved; the CLI exits with 130."""


def fresh_accelerator(**settings) -> Accelerator:
    """An Accelerator with `settings`, whatever an earlier one in this process had. Accelerate keeps one state per
    process and refuses another mixed precision (a bf16 run, then an evaluation or a run in float32: tests,
    scripts); the reset is transformers' own (TrainingArguments), and keeps the process group."""
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(**settings)


def all_processes_agree(accelerator: Accelerator, ok: bool) -> bool:
    """Whether `ok` holds on every process (each process passes its own)."""
    if accelerator.num_processes == 1:
        return ok
    flag = torch.tensor([float(not ok)], device=accelerator.device)
    return accelerator.reduce(flag, reduction="sum").item() == 0


def stop_everywhere(request: StopRequest, accelerator: Accelerator) -> bool:
    """Whether any process was asked to stop (all processes must stop at the same step)."""
    if accelerator.num_processes == 1:
        return request.requested
    flag = torch.tensor([float(request.requested)], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item())


GLOO_WORKERS_GRACE_SECONDS = 0.1
"""How long the main thread lets go of the GIL between the last barrier and tearing the process group down (see
`finish`)."""


def finish(accelerator: Accelerator) -> None:
    """End trackers and tear the process group down while every process is still alive: left to
    the garbage collector, gloo's destructor can wait forever for a process that has exited.

    Before the teardown the main thread sleeps a moment, which lets go of the GIL. A gloo worker thread can still
    hold the last reference to a collective that has finished (one the barrier no longer waits for), and frees its
    Python tensors under the GIL; the teardown (accelerate's `end_training`) holds the GIL while it waits for the
    worker threads to end: a deadlock at exit, one rank never exiting (traced with gdb: ~ProcessGroupGloo joining a
    worker that waits for the GIL in ~AsyncAllgatherWork)."""
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        time.sleep(GLOO_WORKERS_GRACE_SECONDS)
    accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
