"""How long a forward pass takes on the serve engine's thread while another Python thread (the event loop under
load) keeps the interpreter busy, for several of Python's thread switch intervals.

    python scripts/bench_gil_handoff.py                     # MiniLM, ~1 minute on 2 cores
    python scripts/bench_gil_handoff.py --intervals 0.005,0.0002 --duty 1 --repeats 10

PyTorch releases the GIL around every operator, and the engine thread must take it back after each one. When
another thread is running Python, it keeps the GIL until it blocks or until the switch interval has passed
(`sys.setswitchinterval`, 5 ms by default), so each operator of the forward pass can wait up to that long. The
busy thread here spins in Python for 1 ms and then sleeps for `(1 - duty) / duty` ms (duty 1: never sleeps), as an
event loop does when requests keep arriving. Shapes: one short row (a GPU-like forward: many cheap operators) and
a batch of 16 rows of 64 tokens. Each cell is the median of --repeats forward passes, ms.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from softprompt_cli.hub import packaged_model_path  # noqa: E402

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
SHAPES = {"1 x 16": (1, 16), "16 x 64": (16, 64)}


class BusyThread:
    """A thread that runs Python for 1 ms, then sleeps so that it is busy `duty` of the time, until stopped."""

    def __init__(self, duty: float):
        self.pause_s = 0.001 * (1 - duty) / duty
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._spin, daemon=True)

    def _spin(self) -> None:
        while not self.stopping.is_set():
            until = time.perf_counter() + 0.001
            while time.perf_counter() < until:
                pass
            if self.pause_s:
                time.sleep(self.pause_s)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.thread.join()


def forward_ms(model, input_ids: torch.Tensor, repeats: int) -> float:
    """Median time of a forward pass run on a thread of its own, as the engine runs it."""
    times: list[float] = []

    def run() -> None:
        with torch.inference_mode():
            for _ in range(repeats):
                start = time.perf_counter()
                model(input_ids=input_ids)
                times.append(time.perf_counter() - start)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    return 1000 * statistics.median(times)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--intervals", default="0.005,0.001,0.0005,0.0002,0.0001",
                        help="comma-separated switch intervals, in seconds (0.005: Python's default)")
    parser.add_argument("--duty", default="1,0.5", help="comma-separated fractions of time the other thread is busy")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 leaves a core to the busy thread)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModel

    model = AutoModel.from_pretrained(packaged_model_path(MODEL)).eval()
    inputs = {shape: torch.randint(1000, 2000, size) for shape, size in SHAPES.items()}
    for input_ids in inputs.values():
        forward_ms(model, input_ids, 2)
    default = sys.getswitchinterval()
    alone = {shape: forward_ms(model, input_ids, args.repeats) for shape, input_ids in inputs.items()}
    print(f"forward pass of {MODEL}, ms (median of {args.repeats}; torch threads {args.threads}); alone: "
          + ", ".join(f"{shape} {ms:.1f}" for shape, ms in alone.items()))
    print("\n| other thread busy | switch interval | " + " | ".join(f"{shape} ms" for shape in SHAPES) + " |")
    print("|---|---|" + "---|" * len(SHAPES))
    for duty in map(float, args.duty.split(",")):
        for interval in map(float, args.intervals.split(",")):
            sys.setswitchinterval(interval)
            with BusyThread(duty):
                cells = [forward_ms(model, input_ids, args.repeats) for input_ids in inputs.values()]
            sys.setswitchinterval(default)
            print(f"| {duty:.0%} | {interval * 1000:g} ms | " + " | ".join(f"{ms:.1f}" for ms in cells) + " |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
