"""`softprompt eval`: a trained checkpoint (or PEFT adapter) on its recipe's eval split or another split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from softprompt_cli.artifacts.peft import is_peft_adapter
from softprompt_cli.assemble import load_trained
from softprompt_cli.config.schema import Recipe
from softprompt_cli.data.batching import evaluation_loader
from softprompt_cli.data.sources import load_split
from softprompt_cli.errors import UserError
from softprompt_cli.training.control import finish
from softprompt_cli.training.evaluate import evaluate


def evaluate_checkpoint(directory: Path, split: str | None = None, model_path: str | None = None,
                        output: Path | None = None, data_recipe: Recipe | None = None) -> dict[str, Any]:
    if data_recipe is None and is_peft_adapter(directory):
        raise UserError(f"{str(directory)!r} is a PEFT adapter, which says nothing about data: give --recipe "
                        "RECIPE to evaluate it on that recipe's eval split.")
    accelerator = Accelerator()
    recipe, model, tokenizer, label_names = load_trained(directory, model_path, data_recipe)
    split = split or recipe.data.eval_split
    examples = load_split(recipe.data, recipe.task, split, label_names)
    model, eval_loader = accelerator.prepare(model, evaluation_loader(recipe, examples, tokenizer))
    results = evaluate(model, eval_loader, accelerator, recipe, len(label_names), tokenizer, examples.targets)
    report = {"checkpoint": str(directory), "split": split, "examples": len(examples), "metrics": results}
    if output is not None and accelerator.is_main_process:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2) + "\n")
    finish(accelerator)
    return report
