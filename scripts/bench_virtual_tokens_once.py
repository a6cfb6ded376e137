"""Training step time of a decoder's input prompt with its virtual tokens computed once per step (given to every row
as keys and values, the default) against the same virtual tokens in every row's input, on the same batches.

    python scripts/bench_virtual_tokens_once.py recipes/sst2_smollm2_prompt_tuning.yaml [key=value ...] \
        [--steps 12] [--virtual-tokens 10 20 50]

Each step: forward, backward and AdamW step, the two ways alternating batch by batch (so that machine drift falls
on both), after one warm-up step each. Prints the median step time of each and their ratio, one row per prompt
length as soon as it is measured. Not a test: it trains a real model for minutes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path


def step_seconds(model, optimizer, batch: dict, as_prefix: bool) -> float:
    model.virtual_tokens_as_prefix = as_prefix
    model.kind = "prefix" if as_prefix else "input"
    started = time.perf_counter()
    model(**batch)["loss"].backward()
    optimizer.step()
    optimizer.zero_grad()
    return time.perf_counter() - started


def measure(recipe, labels: list[str], base, tokenizer, batches: list[dict]) -> dict[bool, list[float]]:
    import torch

    from softprompt_cli.assemble import build_model

    model, _ = build_model(recipe, labels, base=base, tokenizer=tokenizer)
    if not model.virtual_tokens_as_prefix:
        raise SystemExit(f"{recipe.model.name_or_path} with {recipe.method.name} keeps its virtual tokens in the "
                         "input (an encoder, a prefix method or a sliding window): nothing to compare.")
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.training.lr)
    times: dict[bool, list[float]] = {True: [], False: []}
    for index, batch in enumerate([batches[0]] + batches):
        for as_prefix in (True, False) if index % 2 else (False, True):
            seconds = step_seconds(model, optimizer, batch, as_prefix)
            if index:  # the first batch warms both up
                times[as_prefix].append(seconds)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--virtual-tokens", type=int, nargs="+", default=[10, 20, 50])
    args = parser.parse_args()

    import torch

    from softprompt_cli.assemble import load_frozen
    from softprompt_cli.config.load import load_recipe
    from softprompt_cli.data.batching import training_loader
    from softprompt_cli.data.tasks import load_task_data

    recipe = load_recipe(args.recipe, args.overrides)
    tasks = load_task_data(recipe)
    base, tokenizer = load_frozen(recipe, tasks[0].label_names)
    batches = [batch for _, batch in zip(range(args.steps), training_loader(recipe, tasks, tokenizer))]
    batches = [{k: v for k, v in b.items() if k in ("input_ids", "attention_mask", "labels")} for b in batches]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    print(f"{recipe.model.name_or_path}, {recipe.method.name}, {len(batches)} batches of "
          f"{recipe.training.batch_size} ({tokens / len(batches) / recipe.training.batch_size:.1f} real tokens a row), "
          f"{torch.get_num_threads()} threads; median step time (forward, backward, AdamW):")
    print("| virtual tokens | in every row | computed once | speed-up |\n|---|---|---|---|")
    for n in args.virtual_tokens:
        recipe.method.num_virtual_tokens = n
        times = measure(recipe, tasks[0].label_names, base, tokenizer, batches)
        each, once = statistics.median(times[False]), statistics.median(times[True])
        print(f"| {n} | {1000 * each:.0f} ms | {1000 * once:.0f} ms | {each / once:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
