"""`softprompt compare`: every method on the same data, model, budget and seeds, side by side.

Each run is its own `softprompt train` process: a crash or an out-of-memory in one method is
reported and does not stop the others, and each run's peak memory is its own.
"""

from __future__ import annotations

import copy
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from softprompt_cli import metrics as metric_functions
from softprompt_cli.artifacts.checkpoint import output_lock, refuse_earlier_output
from softprompt_cli.config.load import apply_overrides, parse_recipe, read_yaml
from softprompt_cli.config.schema import MEAN_METRIC, SINGLE_TASK, Recipe
from softprompt_cli.data.tasks import load_task_data
from softprompt_cli.errors import UserError
from softprompt_cli.methods.base import registry


def method_recipe(base: dict, method: str, seed: int, out: Path) -> dict:
    data = copy.deepcopy(base)
    per_method = data.pop("compare", None) or {}
    current = data["method"]
    if current.get("name") != method:  # another method's options do not carry over; the prompt length does
        data["method"] = {"name": method, **({"num_virtual_tokens": current["num_virtual_tokens"]}
                                             if "num_virtual_tokens" in current else {})}
    apply_overrides(data, [f"{k}={json.dumps(v)}" for k, v in (per_method.get(method) or {}).items()])
    data.setdefault("training", {})["seed"] = seed
    data["output"] = {**data.get("output", {}), "dir": str(out), "overwrite": True}
    return data


def _peak_rss(process: subprocess.Popen) -> tuple[int, str]:
    """Wait for the process; return (peak resident memory in bytes, stderr's tail)."""
    import psutil

    peak = 0
    tail: list[str] = []
    reader = threading.Thread(target=lambda: tail.extend(process.stderr.read().splitlines()[-15:]))
    reader.start()
    watched = psutil.Process(process.pid)
    while process.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss + sum(c.memory_info().rss for c in watched.children(True)))
        except psutil.Error:
            pass
        time.sleep(0.2)
    reader.join()
    return peak, "\n".join(tail)


def run_one(recipe: dict, folder: Path) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    recipe_file = folder / "compare_recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False))
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "softprompt_cli", "train", str(recipe_file)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak, stderr_tail = _peak_rss(process)
    result: dict[str, Any] = {"seconds": round(time.perf_counter() - started, 1), "peak_rss_mb": round(peak / 2**20)}
    run_dir = Path(recipe["output"]["dir"])
    if process.returncode != 0 or not (run_dir / "summary.json").is_file():
        lines = [line for line in stderr_tail.splitlines() if line.strip()]
        message = lines[-1].removeprefix("error: ") if lines else f"exit code {process.returncode}"
        return result | {"error": message}
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["examples_per_s"] for r in records if "examples_per_s" in r]
    return result | {
        "summary": summary,
        "losses": [(r["step"], r["loss"]) for r in records if "loss" in r],
        "evals": [(r["epoch"], r["eval"]) for r in records if "eval" in r],
        "examples_per_s": statistics.median(speeds) if speeds else None,
    }


def _mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def table(rows: dict[str, list[dict]], metric_names: list[str]) -> list[str]:
    header = ["method", "trainable params", "checkpoint", *[f"best {m}" for m in metric_names],
              *[f"final {m}" for m in metric_names], "train min", "examples/s", "peak RSS"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, runs in rows.items():
        done = [r for r in runs if "summary" in r]
        errors = [r["error"] for r in runs if "error" in r]
        if not done:
            lines.append(f"| {method} | failed: {errors[0].replace('|', '/')[:200]} |" + " |" * (len(header) - 2))
            continue
        first = done[0]["summary"]
        cells = [method + (f" ({len(errors)} of {len(runs)} runs failed)" if errors else ""),
                 f"{first['trainable_parameters']:,}", f"{first['checkpoint_bytes'] / 1024:.1f} KB"]
        cells += [_mean_std([r["summary"]["best"][m] for r in done]) for m in metric_names]
        cells += [_mean_std([r["summary"]["final"][m] for r in done]) for m in metric_names]
        cells += [f"{statistics.mean(r['summary']['minutes'] for r in done):.1f}",
                  f"{statistics.mean(r['examples_per_s'] for r in done):.1f}",
                  f"{max(r['peak_rss_mb'] for r in done) / 1024:.2f} GB"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot(rows: dict[str, list[dict]], main_metric: str, majority: float | None, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for number, (method, runs) in enumerate(rows.items()):
        color = colors[number % len(colors)]
        for i, run in enumerate(r for r in runs if "summary" in r):  # one color per method, all its seeds
            label = method if i == 0 else None
            epochs = [e for e, _ in run["evals"]]
            left.plot(epochs, [100 * v[main_metric] for _, v in run["evals"]], marker="o", color=color, label=label,
                      alpha=1.0 if i == 0 else 0.6)
            steps, losses = zip(*run["losses"]) if run["losses"] else ((), ())
            right.plot(steps, losses, color=color, label=label, alpha=0.9 if i == 0 else 0.5)
    if majority is not None:
        left.axhline(100 * majority, color="gray", linestyle="--", label="majority class")
    left.set(xlabel="epoch", ylabel=f"dev {main_metric} (%)", title=f"dev {main_metric} per epoch")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set(xlabel="optimizer step", ylabel="training loss", title="training loss (mean over log window)")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def reported_metrics(recipe: Recipe) -> list[str]:
    """The metrics of the report's table: a multi-task recipe's every `<task>/<metric>` and their mean."""
    if not recipe.is_multitask:
        return recipe.metrics
    return [f"{name}/{metric}" for name, task in recipe.task_recipes() for metric in task.metrics] + [MEAN_METRIC]


def majority_baseline(recipe: Recipe) -> tuple[float | None, str]:
    """The main metric of always predicting the most frequent training label (each task's, then their mean, for a
    multi-task recipe), and the report's sentence on it; None for free-form targets, which have no majority."""
    values = {}
    for task in load_task_data(recipe):
        if not task.train.labels:
            return None, ""
        label = max(set(task.train.labels), key=task.train.labels.count)
        main = task.recipe.main_metric
        values[task.name] = metric_functions.compute([main], [label] * len(task.eval), task.eval.labels,
                                                     len(task.label_names),
                                                     task.recipe.task.positive_index(task.label_names))[main]
    if not recipe.is_multitask:
        return values[SINGLE_TASK], f"Majority class: {recipe.main_metric} {100 * values[SINGLE_TASK]:.1f}. "
    mean = statistics.mean(values.values())
    each = ", ".join(f"{name} {task.main_metric} {100 * values[name]:.1f}" for name, task in recipe.task_recipes())
    return mean, f"Majority class: {each}; {MEAN_METRIC} {100 * mean:.1f}. "


def compare(recipe_paths: list[Path], methods: list[str] | None, seeds: int, out: Path, overwrite: bool,
            overrides: list[str]) -> dict[str, Any]:
    known = list(registry())
    methods = methods or known
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise UserError(f"--methods: {', '.join(unknown)} is not a method; the methods are {', '.join(known)}.")
    with output_lock(out):  # two compares into one folder would mix their runs
        refuse_earlier_output(out, overwrite, "Choose another --output, or pass --overwrite.")
        return _run_comparison(recipe_paths, methods, seeds, out, overrides)


def _run_comparison(recipe_paths: list[Path], methods: list[str], seeds: int, out: Path,
                    overrides: list[str]) -> dict[str, Any]:
    report: dict[str, Any] = {"recipes": {}}
    sections = []
    for recipe_path in recipe_paths:
        base = apply_overrides(read_yaml(recipe_path), overrides)
        parse_recipe(base, source=f"recipe {str(recipe_path)!r}")  # the compare block is checked here
        first_seed = int((base.get("training") or {}).get("seed", 42))
        recipes = {(m, s): method_recipe(base, m, first_seed + s, out / recipe_path.stem / m / f"seed{first_seed + s}")
                   for m in methods for s in range(seeds)}
        checked = {key: parse_recipe(r, source=f"recipe {str(recipe_path)!r} for {key[0]}")
                   for key, r in recipes.items()}
        any_recipe = next(iter(checked.values()))
        majority, baseline = majority_baseline(any_recipe)
        rows: dict[str, list[dict]] = {m: [] for m in methods}
        for (method, seed), recipe in recipes.items():
            print(f"[{recipe_path.stem}] {method}, seed {first_seed + seed} ...", flush=True)
            run = run_one(recipe, Path(recipe["output"]["dir"]))
            rows[method].append(run)
            status = run.get("error") or " ".join(f"{k}={100 * v:.1f}" for k, v in run["summary"]["final"].items())
            print(f"    {status} ({run['seconds']:.0f} s)", flush=True)
        title = f"{recipe_path.stem}: {any_recipe.model.name_or_path}, {seeds} seed(s)"
        image = out / (f"report-{recipe_path.stem}.png" if len(recipe_paths) > 1 else "report.png")
        plot(rows, any_recipe.main_metric, majority, title, image)
        lines = table(rows, reported_metrics(any_recipe))
        sections += [f"## {title}", "", *lines, "", f"{baseline}![report]({image.name})", ""]
        report["recipes"][str(recipe_path)] = {
            "majority": majority, "main_metric": any_recipe.main_metric, "tasks": any_recipe.task_names,
            "methods": {m: [{k: v for k, v in r.items() if k not in ("losses", "evals")} for r in runs]
                        for m, runs in rows.items()},
        }
    (out / "report.md").write_text("# softprompt compare\n\n" + "\n".join(sections))
    (out / "summary.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n".join(sections))
    return report
