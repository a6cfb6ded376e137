"""Speed of float32 against bf16 autocast (`training.mixed_precision: bf16`) on the same batches.

For each recipe, two runs are set up in one process as `softprompt train` sets them up (one float32, one bf16),
and the real training step (`train_step`: forward, backward, clipping, AdamW) of each is timed on the same
batches, the two precisions alternating batch by batch (which goes first alternates too), so that the machine's
drift falls on both alike. Then evaluation batches (what `softprompt eval` and `predict` run: forward only) are
timed the same way. Not a test: it loads the real model of each recipe.

    python scripts/bench_precision.py [RECIPE ...] [--steps 30] [--warmup 3] [--set key=value ...]

Default recipes: the three MRPC recipes. Prints a markdown table (median ms per step and per evaluation batch)
and one JSON line per recipe.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from itertools import islice
from pathlib import Path

import torch
from accelerate.utils import set_seed

from softprompt_cli import precision
from softprompt_cli.config.load import load_recipe
from softprompt_cli.config.schema import Recipe
from softprompt_cli.training.loop import Run, make_accelerator, set_up, train_step, with_precision

MRPC_RECIPES = [Path("recipes/mrpc_prompt_tuning.yaml"), Path("recipes/mrpc_ptuning.yaml"),
                Path("recipes/mrpc_prefix_tuning.yaml")]
PRECISIONS = ("no", "bf16")


def make_run(recipe: Recipe, mixed_precision: str) -> Run:
    """The run `softprompt train` would set up with this precision (same seed: same prompt and batches)."""
    recipe = with_precision(recipe, mixed_precision)
    accelerator = make_accelerator(recipe)
    set_seed(recipe.training.seed)
    run = set_up(recipe, accelerator)
    run.model.train()  # as fit() does: the frozen model's dropout is part of the step
    return run


def synchronized_seconds(device: torch.device, started: float) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def time_training_steps(runs: dict[str, Run], batches: list[dict], warmup: int) -> dict[str, list[float]]:
    """Seconds of each precision's train_step on every batch after the first `warmup`, alternating precisions."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for number, batch in enumerate(batches):
        order = list(runs) if number % 2 == 0 else list(reversed(runs))
        for name in order:
            run = runs[name]
            started = time.perf_counter()
            train_step(run, batch, number + 1)
            elapsed = synchronized_seconds(run.accelerator.device, started)
            if number >= warmup:
                seconds[name].append(elapsed)
    return seconds


@torch.no_grad()
def time_evaluation_batches(run: Run, batches: list[dict], warmup: int) -> dict[str, list[float]]:
    """Seconds of one evaluation forward pass (label scores) per batch in each precision, alternating."""
    model = run.unwrapped.eval()
    seconds: dict[str, list[float]] = {name: [] for name in PRECISIONS}
    for number, batch in enumerate(batches):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        order = PRECISIONS if number % 2 == 0 else tuple(reversed(PRECISIONS))
        for name in order:
            started = time.perf_counter()
            with precision.autocast(name, run.accelerator.device.type):
                model.scores(**inputs)
            elapsed = synchronized_seconds(run.accelerator.device, started)
            if number >= warmup:
                seconds[name].append(elapsed)
    model.train()
    return seconds


def bench_recipe(path: Path, overrides: list[str], steps: int, warmup: int, eval_batches: int) -> dict:
    recipe = load_recipe(path, overrides)
    runs = {name: make_run(recipe, name) for name in PRECISIONS}
    first = runs[PRECISIONS[0]]
    batches = list(islice(iter(first.train_loader), warmup + steps))
    train = time_training_steps(runs, batches, warmup)
    evaluation = time_evaluation_batches(first, list(islice(iter(first.eval_loader), warmup + eval_batches)), warmup)
    rows = sum(len(b["labels"]) for b in batches[warmup:])
    result = {"recipe": path.stem, "method": recipe.method.name, "device": str(first.accelerator.device),
              "threads": torch.get_num_threads(), "steps": len(train["no"]), "train_rows": rows,
              **{f"step_ms_{precision.display_name(n)}": round(1000 * statistics.median(s), 1)
                 for n, s in train.items()},
              **{f"eval_batch_ms_{precision.display_name(n)}": round(1000 * statistics.median(s), 1)
                 for n, s in evaluation.items()}}
    result["step_speedup_bf16"] = round(result["step_ms_fp32"] / result["step_ms_bf16"], 2)
    result["eval_speedup_bf16"] = round(result["eval_batch_ms_fp32"] / result["eval_batch_ms_bf16"], 2)
    del runs, first, batches
    gc.collect()
    return result


def print_table(results: list[dict]) -> None:
    print("| recipe | device, threads | train step fp32 | bf16 | bf16 speedup | eval batch fp32 | bf16 "
          "| bf16 speedup |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['recipe']} | {r['device']}, {r['threads']} | {r['step_ms_fp32']} ms | {r['step_ms_bf16']} ms | "
              f"{r['step_speedup_bf16']}x | {r['eval_batch_ms_fp32']} ms | {r['eval_batch_ms_bf16']} ms | "
              f"{r['eval_speedup_bf16']}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="*", type=Path, default=MRPC_RECIPES)
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per precision")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first batches")
    parser.add_argument("--eval-batches", type=int, default=6, help="timed evaluation batches per precision")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="recipe override for every recipe, e.g. model.name_or_path=DIR (repeatable)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    device = make_accelerator(load_recipe(args.recipes[0], args.overrides)).device
    print(f"{device}: bf16 computed natively: {precision.computes_bf16_natively(device)}; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    results = []
    for path in args.recipes:
        results.append(bench_recipe(path, args.overrides, args.steps, args.warmup, args.eval_batches))
        print(json.dumps(results[-1]), flush=True)
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
