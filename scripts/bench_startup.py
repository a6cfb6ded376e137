"""Time to first prediction: the wall time of `softprompt predict` on two rows and of `softprompt eval`, for a
MiniLM and a SmolLM2 checkpoint, each the median of --repeat runs (each run a fresh process, so it pays every
import and the model load).

    softprompt train recipes/mrpc_prompt_tuning.yaml training.max_steps=3 data.max_train_samples=48 \\
        data.max_eval_samples=16 output.dir=/tmp/su/minilm
    softprompt train recipes/sst2_smollm2_prompt_tuning.yaml training.max_steps=2 training.batch_size=4 \\
        data.max_train_samples=32 data.max_eval_samples=8 output.dir=/tmp/su/smol
    python scripts/bench_startup.py /tmp/su/minilm/best /tmp/su/smol/best
    # before/after: another copy of the package (git archive HEAD softprompt_cli | tar -x -C /tmp/before)
    python scripts/bench_startup.py /tmp/su/minilm/best /tmp/su/smol/best --before /tmp/before

With --before, each run of this tree alternates with a run of that one, so that both see the same load on a shared
machine. Each command first runs once untimed (a GGUF model's first run writes its dequantized copy into the cache;
the files are then in the page cache for every tree alike). Each run holds --lock (flock) while it runs, so that
timed runs do not overlap; the time measured is the command's own, not the wait for the lock. CPU seconds (user +
system) are reported too: they vary less than wall time when other work shares the machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

CLI = [sys.executable, "-P", "-m", "softprompt_cli"]  # -P: the package comes from sys.path, not the cwd
PAIR_ROWS = ["--text", "The cat sat on the mat.", "--text-pair", "A cat was sitting on the mat.",
             "--text", "He left early.", "--text-pair", "Stocks fell sharply."]
SINGLE_ROWS = ["--text", "an awful, boring mess.", "--text", "a wonderful, moving film."]
# Run inside the lock: the command, then its exit code, wall seconds and CPU seconds on one line.
TIMER = """
import resource, subprocess, sys, time
start = time.perf_counter()
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(code, time.perf_counter() - start, usage.ru_utime + usage.ru_stime)
"""


def timed_run(command: list[str], lock: str, package_root: str | None) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one run; `package_root`: import softprompt_cli from there instead."""
    env = dict(os.environ)
    if package_root is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    result = subprocess.run(["flock", lock, sys.executable, "-c", TIMER, *command],
                            capture_output=True, text=True, env=env)
    if result.returncode != 0 or not result.stdout.strip() or result.stdout.split()[-3] != "0":
        sys.exit(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    wall, cpu = result.stdout.split()[-2:]
    return float(wall), float(cpu)


def cell(runs: list[tuple[float, float]]) -> str:
    walls, cpus = [w for w, _ in runs], [c for _, c in runs]
    return (f"{statistics.median(walls):.1f} ({' / '.join(f'{w:.1f}' for w in walls)}) | "
            f"{statistics.median(cpus):.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("minilm", help="a MiniLM (MRPC) checkpoint folder")
    parser.add_argument("smollm2", help="a SmolLM2 (SST-2) checkpoint folder")
    parser.add_argument("--before", help="a folder holding another softprompt_cli package to compare with")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--lock", default="/tmp/softprompt-cpu.lock")
    args = parser.parse_args()
    cases = [("MiniLM predict (2 rows)", [*CLI, "predict", args.minilm, *PAIR_ROWS]),
             ("MiniLM eval", [*CLI, "eval", args.minilm]),
             ("SmolLM2 predict (2 rows)", [*CLI, "predict", args.smollm2, *SINGLE_ROWS]),
             ("SmolLM2 eval", [*CLI, "eval", args.smollm2])]
    trees = {"before": args.before, "after": None} if args.before else {"this tree": None}
    header = " | ".join(f"{tree}: wall s, median (runs) | {tree}: CPU s" for tree in trees)
    print(f"| command | {header} |\n|---|{'---|---|' * len(trees)}")
    for name, command in cases:
        runs: dict[str, list] = {tree: [] for tree in trees}
        for root in trees.values():
            timed_run(command, args.lock, root)  # warm-up
        for _ in range(args.repeat):
            for tree, root in trees.items():
                runs[tree].append(timed_run(command, args.lock, root))
        print(f"| {name} | {' | '.join(cell(r) for r in runs.values())} |", flush=True)


if __name__ == "__main__":
    main()
