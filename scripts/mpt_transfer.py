"""Does multitask prompt tuning's transfer help? MRPC with few to all training pairs, from sources trained on
SST-2, CoLA and AG News, against prompt tuning from scratch and against the plain multi-task prompt.

Stages (each run's result is appended to RESULTS as it ends; a rerun skips what is there):
1. sources: recipes/mpt_source_minilm.yaml as is (MPT), the same recipe with prompt_tuning (the plain
   multi-task prompt: one shared prompt, per-task heads), and each source task's single-task prompt tuning
   with the same data and epochs (the source-task reference);
2. targets: MRPC with N training pairs (the first N of train.tsv) for N in --sizes, seeds in --seeds, the same
   budget for every arm (--steps optimizer steps of 16 pairs, evaluated once at the end on the 408 dev pairs):
   MPT from the source (source_shared, source_task, source_average), prompt tuning from scratch (sample_vocab,
   text), and the plain multi-task prompt (MPT's source_shared from the prompt_tuning source: its prompt is P).

    python scripts/mpt_transfer.py                         # all of it: about an hour on 2 CPU cores
    python scripts/mpt_transfer.py --sizes 64 --seeds 0    # one column, one seed
    python scripts/mpt_transfer.py --report                # the tables from RESULTS only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE_RECIPE = REPO / "recipes" / "mpt_source_minilm.yaml"
TARGET_RECIPE = REPO / "recipes" / "mpt_target_mrpc.yaml"
TEXT_INIT = "Do the two sentences say the same thing? Answer yes or no."
ARMS = ("mpt_source_shared", "mpt_source_task", "mpt_source_average", "pt_sample_vocab", "pt_text",
        "plain_multitask")
ARM_NAMES = {
    "mpt_source_shared": "MPT target, init source_shared",
    "mpt_source_task": "MPT target, init source_task ({task})",
    "mpt_source_average": "MPT target, init source_average",
    "pt_sample_vocab": "prompt tuning from scratch, sample_vocab",
    "pt_text": "prompt tuning from scratch, text",
    "plain_multitask": "plain multi-task prompt (prompt_tuning source) as P",
}


def recipe_data(path: Path) -> dict:
    from softprompt_cli.config.load import read_yaml

    data = read_yaml(path)
    for entry in data.get("tasks") or [{"data": data.get("data")}]:  # paths are relative to the repository
        if entry["data"].get("dir"):
            entry["data"]["dir"] = str((REPO / entry["data"]["dir"]).resolve())
        if entry["data"].get("files"):
            entry["data"]["files"] = {k: str((REPO / v).resolve()) for k, v in entry["data"]["files"].items()}
    return data


def run(data: dict, out: Path) -> dict:
    """Train one recipe (as `softprompt train` does) into `out`; its summary."""
    from softprompt_cli.config.load import parse_recipe
    from softprompt_cli.training.loop import train

    data = {**data, "output": {"dir": str(out), "overwrite": True}}
    return train(parse_recipe(data, source=str(out)))


def source_runs(work: Path) -> dict[str, dict]:
    """name -> recipe of every source-stage run."""
    source = recipe_data(SOURCE_RECIPE)
    runs = {"source_mpt": source,
            "source_plain": {**source, "method": {"name": "prompt_tuning", "num_virtual_tokens":
                                                  source["method"]["num_virtual_tokens"], "init": "sample_vocab"}}}
    for entry in source["tasks"]:
        runs[f"single_{entry['name']}"] = {
            "model": source["model"], "data": entry["data"], "task": entry.get("task", {}),
            "method": runs["source_plain"]["method"],
            "training": {**source["training"], "eval_steps": None}}
    return runs


def target_recipe(arm: str, size: int | None, seed: int, steps: int, work: Path, init_task: str) -> dict:
    target = recipe_data(TARGET_RECIPE)
    n = target["method"]["num_virtual_tokens"]
    method = {"name": "multitask_prompt_tuning", "num_virtual_tokens": n, "rank": target["method"]["rank"]}
    if arm.startswith("mpt_"):
        method |= {"init": arm.removeprefix("mpt_"), "init_checkpoint": str(work / "source_mpt" / "final")}
        if arm == "mpt_source_task":
            method["init_task"] = init_task
    elif arm == "plain_multitask":
        method |= {"init": "source_shared", "init_checkpoint": str(work / "source_plain" / "final")}
    else:
        method = {"name": "prompt_tuning", "num_virtual_tokens": n, "init": arm.removeprefix("pt_")}
        if arm == "pt_text":
            method["init_text"] = TEXT_INIT
    data = {**target["data"], "max_train_samples": size}
    training = {**target["training"], "max_steps": steps, "seed": seed, "eval_each_epoch": False,
                "log_steps": steps}
    return {**target, "data": data, "method": method, "training": training}


def record(results: Path, entry: dict) -> None:
    with results.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")


def done(results: Path) -> dict[str, dict]:
    if not results.is_file():
        return {}
    entries = [json.loads(line) for line in results.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {entry["run"]: entry for entry in entries}


def run_all(args) -> None:
    work, results = Path(args.work), Path(args.results)
    work.mkdir(parents=True, exist_ok=True)
    finished = done(results)
    for name, data in source_runs(work).items():
        if name not in finished:
            started = time.perf_counter()
            summary = run(data, work / name)
            record(results, {"run": name, "final": summary["final"], "minutes": round(
                (time.perf_counter() - started) / 60, 2), "steps": summary["steps"]})
            print(f"{name}: {summary['final']}", flush=True)
    for size in args.sizes:
        for seed in args.seeds:
            for arm in args.arms:
                name = f"target_{arm}_{size}_{seed}"
                if name in finished:
                    continue
                summary = run(target_recipe(arm, None if size == 0 else size, seed, args.steps, work,
                                            args.init_task), work / "target")
                record(results, {"run": name, "arm": arm, "size": size, "seed": seed, "final": summary["final"],
                                 "train_examples": summary["steps"] * 16})
                print(f"{name}: {summary['final']}", flush=True)


def cell(values: list[float]) -> str:
    if not values:
        return "–"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * spread:.1f}"


def report(args) -> str:
    entries = done(Path(args.results))
    lines = ["Target MRPC dev (408 pairs), accuracy / F1, mean ± std over seeds "
             f"{', '.join(map(str, args.seeds))}; {args.steps} steps of 16 pairs for every cell:", "",
             "| arm | " + " | ".join("all" if s == 0 else str(s) for s in args.sizes) + " |",
             "|---|" + "---|" * len(args.sizes)]
    for arm in args.arms:
        row = [ARM_NAMES[arm].format(task=args.init_task)]
        for size in args.sizes:
            runs = [e for e in entries.values() if e.get("arm") == arm and e.get("size") == size]
            row.append(f"{cell([e['final']['accuracy'] for e in runs])} / {cell([e['final']['f1'] for e in runs])}")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Source tasks after source training (dev metrics; AG News: held-out 10% of train):", "",
              "| run | sst2 acc | cola mcc | ag_news acc | minutes |", "|---|---|---|---|---|"]
    for name in ("source_mpt", "source_plain"):
        final = entries.get(name, {}).get("final", {})
        lines.append(f"| {name} | " + " | ".join(f"{100 * final[k]:.1f}" if k in final else "–" for k in (
            "sst2/accuracy", "cola/matthews_correlation", "ag_news/accuracy"))
                     + f" | {entries.get(name, {}).get('minutes', '–')} |")
    single = [entries.get(f"single_{t}", {}).get("final", {}) for t in ("sst2", "cola", "ag_news")]
    lines.append("| single-task prompt tuning (one run per task) | " + " | ".join(
        f"{100 * final[k]:.1f}" if k in final else "–"
        for final, k in zip(single, ("accuracy", "matthews_correlation", "accuracy")))
        + " | " + str(round(sum(entries.get(f"single_{t}", {}).get("minutes", 0) for t in ("sst2", "cola",
                                                                                            "ag_news")), 2)) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024, 0], help="0: all 3,668 pairs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--init-task", default="sst2", help="source_task's task")
    parser.add_argument("--work", default=str(REPO / "runs" / "mpt_transfer"))
    parser.add_argument("--results", default=str(REPO / "runs" / "mpt_transfer" / "results.jsonl"))
    parser.add_argument("--report", action="store_true", help="print the tables of RESULTS and stop")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    if not args.report:
        run_all(args)
    print(report(args))


if __name__ == "__main__":
    sys.exit(main())
