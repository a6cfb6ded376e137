"""Training step time against the number of virtual tokens: softprompt and Hugging Face PEFT on the same batch.

    python scripts/bench_prompt_length.py                    # MiniLM on MRPC, 3 methods x 10/50/200 tokens, ~5 min
    python scripts/bench_prompt_length.py --methods p_tuning --lengths 200 --steps 5
    python scripts/bench_prompt_length.py --job smollm2-sst2 --lengths 10,50,200    # the causal LM

Job and method settings are scripts/bench_vs_peft.py's (`--job`: its JOBS; PEFT's example hyperparameters),
with `num_virtual_tokens` set to each length. The batch is the job's first 16 training rows, padded to their
longest, the same tensors for both tools (PEFT's step on softprompt's batch, as in bench_vs_peft's one-process
worker). A step is each tool's own training step: forward, backward, gradient clipping, AdamW, schedule, in
training mode (attention dropout on). For each method and length both tools' models are built in one process
and their steps alternate (ours, PEFT, PEFT, ours, ...), so that drift of the machine hits both alike; each
column is the median of `--steps` timed steps after `--warmup` untimed ones (`--clock cpu`: the process's CPU
time instead of wall time, which other processes on the machine disturb less). Each row is printed as soon as it
is measured.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_vs_peft import JOBS
from peft_baselines import build_peft_run, peft_train_step

from softprompt_cli.config.load import parse_recipe
from softprompt_cli.config.schema import Recipe
from softprompt_cli.data.tasks import load_task_data
from softprompt_cli.training.loop import make_accelerator, set_up, train_step

BATCH_SIZE = 16
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
Step = Callable[[], None]


def length_recipe(job: str, method: str, num_virtual_tokens: int, glue_dir: Path, out: str) -> Recipe:
    """The job's recipe for `method` at `num_virtual_tokens`, training on its first 16 rows: one batch."""
    settings = JOBS[job].methods[method]
    sections = copy.deepcopy(JOBS[job].sections)
    sections["data"] |= {"dir": str(glue_dir), "max_train_samples": BATCH_SIZE, "max_eval_samples": BATCH_SIZE}
    return parse_recipe({
        **sections,
        "method": {"name": method, "num_virtual_tokens": num_virtual_tokens, **settings.softprompt},
        "training": {"lr": settings.lr, "batch_size": BATCH_SIZE, "mixed_precision": "no"},  # float32, as PEFT's
        "output": {"dir": out},
    })


def step_functions(recipe: Recipe, peft_options: dict | None) -> tuple[dict[str, torch.Tensor], list[Step]]:
    """The batch, and each tool's training step on it: softprompt's, then PEFT's (with these extra PEFT config
    fields; None: softprompt alone)."""
    ours = set_up(recipe, make_accelerator(recipe))
    ours.model.train()
    batch = next(iter(ours.train_loader))
    step_numbers = itertools.count(1)
    steps = [lambda: train_step(ours, batch, next(step_numbers))]
    if peft_options is not None:
        theirs = build_peft_run(recipe, load_task_data(recipe), peft_options)
        theirs.model.train()
        steps.append(lambda: peft_train_step(theirs, batch))
    return batch, steps


def median_step_ms(steps: list[Step], warmup: int, timed: int, clock: Callable[[], float]) -> list[float]:
    """Each step function's median time in ms, the functions alternating A B, B A, ..."""
    seconds: list[list[float]] = [[] for _ in steps]
    for i in range(warmup + timed):
        order = list(enumerate(steps))
        for index, step in order if i % 2 == 0 else order[::-1]:
            torch.manual_seed(i)  # the same dropout draws for both tools' i-th step, at every length
            start = clock()
            step()
            if i >= warmup:
                seconds[index].append(clock() - start)
    return [1000 * statistics.median(s) for s in seconds]


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", choices=sorted(JOBS), default="minilm-mrpc")
    parser.add_argument("--methods", default="prompt_tuning,p_tuning,prefix_tuning")
    parser.add_argument("--lengths", default="10,50,200", help="numbers of virtual tokens")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per tool (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    parser.add_argument("--no-peft", action="store_true", help="time softprompt alone")
    parser.add_argument("--glue-dir", type=Path, default=Path("../shared/data/glue"))
    return parser.parse_args()


def main() -> None:
    args = parse_arguments()
    torch.set_num_threads(args.threads)
    header = False
    for method in args.methods.split(","):
        for n in (int(length) for length in args.lengths.split(",")):
            with tempfile.TemporaryDirectory() as out:
                peft_options = None if args.no_peft else JOBS[args.job].methods[method].peft
                batch, steps = step_functions(length_recipe(args.job, method, n, args.glue_dir, out), peft_options)
                times = median_step_ms(steps, args.warmup, args.steps, CLOCKS[args.clock])
            if not header:  # it names the batch's length, known once the first recipe has loaded it
                print(f"{JOBS[args.job].title}, one batch of {BATCH_SIZE} rows ({batch['input_ids'].shape[1]} tokens "
                      f"padded), {args.threads} threads; median of {args.steps} training steps, ms ({args.clock} "
                      "clock):\n\n| method | virtual tokens | softprompt | PEFT | PEFT / softprompt |\n"
                      "|---|---|---|---|---|")
                header = True
            peft = ["", ""] if args.no_peft else [f"{times[1]:.0f}", f"{times[1] / times[0]:.2f}x"]
            print(f"| {method} | {n} | {times[0]:.0f} | " + " | ".join(peft) + " |", flush=True)


if __name__ == "__main__":
    main()
