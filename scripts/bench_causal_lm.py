"""Zero-shot vs trained soft prompt for a causal_lm recipe: the frozen model with the recipe's template
alone, then `softprompt train`, both evaluated the same way (rank classification or exact match).

    python scripts/bench_causal_lm.py recipes/sst2_smollm2_prompt_tuning.yaml [key=value ...]

Prints the dev metrics and times. Not a test: it trains a real model for minutes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def zero_shot(recipe) -> tuple[dict, float]:
    from accelerate import Accelerator

    from softprompt_cli.assemble import build_model
    from softprompt_cli.data.batching import evaluation_loader
    from softprompt_cli.data.tasks import all_targets, load_task_data
    from softprompt_cli.training.evaluate import evaluate

    tasks = load_task_data(recipe)
    model, tokenizer = build_model(recipe, tasks[0].label_names)
    eval_loader = evaluation_loader(recipe, tasks, tokenizer)
    accelerator = Accelerator()
    started = time.perf_counter()
    results = evaluate(model, eval_loader, accelerator, recipe, tasks[0].label_names, tokenizer, all_targets(tasks),
                       with_prompt=False)
    return results, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from softprompt_cli.config.load import load_recipe
    from softprompt_cli.training.loop import train

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.task.type != "causal_lm":
        raise SystemExit("this benchmark is for causal_lm recipes")
    baseline, baseline_seconds = zero_shot(recipe)
    with tempfile.TemporaryDirectory() as out:
        recipe.output.dir = out
        summary = train(recipe)
    metric = recipe.main_metric
    rows = [("zero-shot (template only)", baseline, baseline_seconds, None),
            (f"{recipe.method.name}, {summary['steps']} steps", summary["final"], None, summary["train_seconds"])]
    print(f"\n{args.recipe} ({recipe.model.name_or_path}), dev {metric}, "
          f"{recipe.data.max_train_samples or 'all'} train / {recipe.data.max_eval_samples or 'all'} dev examples")
    print(f"| run | dev {metric} | train time | eval time |\n|---|---|---|---|")
    for name, results, eval_seconds, train_seconds in rows:
        print(f"| {name} | {100 * results[metric]:.1f} | "
              f"{'-' if train_seconds is None else f'{train_seconds / 60:.1f} min'} | "
              f"{'-' if eval_seconds is None else f'{eval_seconds:.0f} s'} |")
    print(json.dumps({"zero_shot": baseline, "trained": summary["final"], "train_seconds": summary["train_seconds"],
                      "zero_shot_eval_seconds": round(baseline_seconds, 1)}))


if __name__ == "__main__":
    main()
