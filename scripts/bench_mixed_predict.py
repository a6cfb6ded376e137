"""Throughput of `softprompt predict` with rows of two tasks mixed in the same batches, against the
same rows served in single-task batches (same loaded model, same batch size).

    python scripts/bench_mixed_predict.py runs/mrpc_prompt_tuning/best runs/sst2_prompt_tuning/best

Rows: the MRPC dev pairs and the SST-2 dev sentences (../shared/data/glue), interleaved. Prints
rows/s for each mode (median of --repeats runs) and checks that both give the same labels.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from softprompt_cli.data.sources import read_table
from softprompt_cli.inference.batches import make_items, predict
from softprompt_cli.inference.tasks import load_tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mrpc_checkpoint")
    parser.add_argument("sst2_checkpoint")
    parser.add_argument("--glue-dir", type=Path, default=Path("../shared/data/glue"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    tasks, tokenizer = load_tasks([f"mrpc={args.mrpc_checkpoint}", f"sst2={args.sst2_checkpoint}"])
    mrpc = [{"task": "mrpc", **row} for row in read_table(args.glue_dir / "MRPC" / "dev.tsv", "tsv")]
    sst2 = [{"task": "sst2", **row} for row in read_table(args.glue_dir / "SST-2" / "dev.tsv", "tsv")]
    rows = [row for pair in zip(mrpc, sst2) for row in pair] + mrpc[len(sst2):] + sst2[len(mrpc):]
    items = make_items(rows, tasks, tokenizer, "task", None)
    by_task = {name: [item for item in items if item.task.name == name] for name in tasks}

    def timed(run) -> tuple[float, list]:
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = run()
            seconds.append(time.perf_counter() - start)
        return statistics.median(seconds), result

    mixed_seconds, mixed = timed(lambda: predict(items, tokenizer, args.batch_size))
    single_seconds, single = timed(lambda: {name: predict(group, tokenizer, args.batch_size)
                                            for name, group in by_task.items()})
    single_by_item = {id(item): p for name, group in by_task.items() for item, p in zip(group, single[name])}
    agree = sum(int(torch.argmax(p) == torch.argmax(single_by_item[id(item)])) for item, p in zip(items, mixed))
    print(f"{len(items)} rows ({len(mrpc)} MRPC pairs, {len(sst2)} SST-2 sentences), batch size {args.batch_size}, "
          f"{torch.get_num_threads()} threads")
    print("| mode | rows/s | seconds |")
    print("|---|---|---|")
    print(f"| mixed-task batches | {len(items) / mixed_seconds:.1f} | {mixed_seconds:.2f} |")
    print(f"| single-task batches | {len(items) / single_seconds:.1f} | {single_seconds:.2f} |")
    print(f"same label in both modes: {agree}/{len(items)}")


if __name__ == "__main__":
    main()
