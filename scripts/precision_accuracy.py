"""Dev metrics and speed of float32 against bf16 autocast, on full training runs.

Runs `softprompt train RECIPE training.mixed_precision=P training.seed=S` for every recipe, precision and seed,
several at once as separate processes (the runs of one recipe and seed, one per precision, start together, so
that they share the machine alike), and prints one table: each run's final and best dev metrics, training
examples/s and minutes, then each recipe's means over seeds and the bf16 - float32 difference. The table file is
rewritten after every finished run, so a job cut short keeps what finished.

    python scripts/precision_accuracy.py [RECIPE ...] [--seeds 42 43 44] [--precisions no bf16] [--jobs 6]
        [--set model.name_or_path=DIR --set data.dir=DIR ...] [--out runs/precision] [--table FILE]

Default recipes: the three MRPC recipes. Speeds of runs that shared the machine compare only with each other.
Not a test: it trains real models.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

MRPC_RECIPES = [Path("recipes/mrpc_prompt_tuning.yaml"), Path("recipes/mrpc_ptuning.yaml"),
                Path("recipes/mrpc_prefix_tuning.yaml")]


@dataclass
class Job:
    recipe: Path
    precision: str
    seed: int
    folder: Path
    summary: dict | None = None
    error: str | None = None
    wall_minutes: float = 0.0
    started: float = field(default=0.0, repr=False)

    @property
    def name(self) -> str:
        return f"{self.recipe.stem}-{self.precision}-seed{self.seed}"


def train_command(job: Job, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "softprompt_cli", "train", str(job.recipe), *overrides,
            f"training.mixed_precision={job.precision}", f"training.seed={job.seed}",
            f"output.dir={job.folder}", "output.overwrite=true"]


def run_job(job: Job, overrides: list[str], threads: int) -> Job:
    """Train one run in its own process (log in <folder>.log); its summary, or the end of its log on failure."""
    log = job.folder.with_suffix(".log")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    job.started = time.perf_counter()
    with log.open("w") as handle:
        done = subprocess.run(train_command(job, overrides), stdout=handle, stderr=subprocess.STDOUT, env=env)
    job.wall_minutes = (time.perf_counter() - job.started) / 60
    summary = job.folder / "summary.json"
    if done.returncode == 0 and summary.is_file():
        job.summary = json.loads(summary.read_text())
    else:
        job.error = f"exit {done.returncode}: " + " | ".join(log.read_text(errors="replace").splitlines()[-3:])
    return job


def shown(precision: str) -> str:
    return "fp32" if precision == "no" else precision


def metric_cells(results: dict, names: list[str]) -> list[str]:
    return [f"{100 * results[n]:.1f}" if n in results else "-" for n in names]


def run_rows(jobs: list[Job], metrics: list[str]) -> list[str]:
    rows = []
    for job in jobs:
        if job.summary is None:
            rows.append(f"| {job.recipe.stem} | {shown(job.precision)} | {job.seed} | "
                        + ("failed: " + job.error.replace("|", "/") if job.error else "running or not started")
                        + " |" * (2 * len(metrics) + 2))
            continue
        s = job.summary
        ran = shown(s.get("mixed_precision", job.precision))  # what auto resolved to, where it was asked
        rows.append("| " + " | ".join([job.recipe.stem, ran, str(job.seed), *metric_cells(s["final"], metrics),
                                       *metric_cells(s["best"], metrics), f"{s['train_examples_per_s']:.1f}",
                                       f"{s['train_seconds'] / 60:.2f}", f"{job.wall_minutes:.2f}"]) + " |")
    return rows


def mean_rows(jobs: list[Job], metrics: list[str], precisions: list[str]) -> list[str]:
    """Per recipe and precision: means (and sample std) over the finished seeds; then bf16 - fp32."""
    rows = []
    for recipe in dict.fromkeys(job.recipe for job in jobs):
        means = {}
        for precision in precisions:
            done = [j.summary for j in jobs if j.recipe == recipe and j.precision == precision and j.summary]
            if not done:
                continue
            values = {m: [100 * s["final"][m] for s in done if m in s["final"]] for m in metrics}
            means[precision] = {m: statistics.mean(v) for m, v in values.items() if v}
            spread = {m: (f" ± {statistics.stdev(v):.1f}" if len(v) > 1 else "") for m, v in values.items() if v}
            speed = statistics.mean(s["train_examples_per_s"] for s in done)
            rows.append(f"| {recipe.stem} | {shown(precision)} | {len(done)} seed(s) | "
                        + " | ".join(f"{means[precision][m]:.1f}{spread[m]}" for m in means[precision])
                        + f" | {speed:.1f} ex/s |")
        if len(means) == 2:
            first, second = (means[p] for p in precisions)
            rows.append(f"| {recipe.stem} | {shown(precisions[1])} - {shown(precisions[0])} | | "
                        + " | ".join(f"{second[m] - first[m]:+.1f}" for m in first if m in second) + " | |")
    return rows


def render(jobs: list[Job], metrics: list[str], precisions: list[str], header: str) -> str:
    columns = ["recipe", "precision", "seed", *(f"final {m}" for m in metrics), *(f"best {m}" for m in metrics),
               "train ex/s", "train min", "wall min"]
    lines = [header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns), *run_rows(jobs, metrics),
             "", "Means over seeds (final dev metrics):", "",
             "| recipe | precision | seeds | " + " | ".join(f"final {m}" for m in metrics) + " | train speed |",
             "|" + "---|" * (4 + len(metrics)), *mean_rows(jobs, metrics, precisions)]
    return "\n".join(lines) + "\n"


@dataclass
class Report:
    """The table so far, rewritten (if `path`) whenever a run finishes."""

    jobs: list[Job]
    metrics: list[str]
    precisions: list[str]
    header: str
    path: Path | None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def text(self) -> str:
        return render(self.jobs, self.metrics, self.precisions, self.header)

    def finished(self, future: Future) -> None:
        job = future.result()
        with self.lock:
            print(f"done {job.name} in {job.wall_minutes:.1f} min" + (f" ({job.error})" if job.error else ""),
                  flush=True)
            if self.path:
                self.path.write_text(self.text())


def plan(args: argparse.Namespace) -> list[Job]:
    """Every run, ordered so that the precisions of one recipe and seed start together."""
    return [Job(recipe, precision, seed, args.out / f"{recipe.stem}-{precision}-seed{seed}")
            for seed in args.seeds for recipe in args.recipes for precision in args.precisions]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="*", type=Path, default=MRPC_RECIPES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[42])
    parser.add_argument("--precisions", nargs=2, default=["no", "bf16"], help="training.mixed_precision values")
    parser.add_argument("--jobs", type=int, default=6, help="runs at once")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="override for every run, e.g. model.name_or_path=DIR (repeatable)")
    parser.add_argument("--metrics", nargs="+", default=["accuracy", "f1"], help="dev metrics shown")
    parser.add_argument("--out", type=Path, default=Path("runs/precision"), help="run folders and logs")
    parser.add_argument("--table", type=Path, help="also write the table here (rewritten after every run)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = plan(args)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    header = (f"{len(jobs)} runs, {args.jobs} at a time ({threads} CPU thread(s) each), seeds {args.seeds}; "
              f"overrides: {' '.join(args.overrides) or 'none'}")
    report = Report(jobs, args.metrics, args.precisions, header, args.table)
    with ThreadPoolExecutor(args.jobs) as pool:
        for future in [pool.submit(run_job, job, args.overrides, threads) for job in jobs]:
            future.add_done_callback(report.finished)
    text = report.text()
    print(text)
    if args.table:
        args.table.write_text(text)
    sys.exit(1 if any(job.error for job in jobs) else 0)


if __name__ == "__main__":
    main()
