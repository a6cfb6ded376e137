"""Loading a trained checkpoint onto its base model, and evaluating it on a split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from accelerate import Accelerator

from softprompt_cli.data import loader
from softprompt_cli.errors import UserError
from softprompt_cli.modeling import config_fingerprint
from softprompt_cli.peft_format import is_peft_adapter, read_any_checkpoint
from softprompt_cli.recipe import Recipe, parse_recipe
from softprompt_cli.sources import load_split
from softprompt_cli.train import build_model, evaluate, finish, tokenize_examples


def load_trained(directory: Path, model_path: str | None = None, data_recipe: Recipe | None = None):
    """(recipe, model, tokenizer, label names) of a checkpoint (or PEFT adapter), refusing a base model
    that differs from the one it was trained on."""
    info, recipe_yaml, tensors = read_any_checkpoint(directory, data_recipe)
    recipe = parse_recipe(yaml.safe_load(recipe_yaml), source=f"recipe in checkpoint {str(directory)!r}")
    if model_path is not None:
        recipe.model.name_or_path = model_path
    label_names = info["label_names"]
    model, tokenizer = build_model(recipe, label_names)
    expected = info["base_model"]["fingerprint"]
    actual = config_fingerprint(model.base.config)
    if actual != expected:
        raise UserError(
            f"checkpoint {str(directory)!r} was trained on {info['base_model']['name_or_path']!r} (config fingerprint "
            f"{expected}), but {recipe.model.name_or_path!r} has fingerprint {actual}: a different model. "
            "Use the base model the checkpoint was trained on."
        )
    model.load_trainable_state(tensors)
    return recipe, model, tokenizer, label_names


def evaluate_checkpoint(directory: Path, split: str | None = None, model_path: str | None = None,
                        output: Path | None = None, data_recipe: Recipe | None = None) -> dict[str, Any]:
    if data_recipe is None and is_peft_adapter(directory):
        raise UserError(f"{str(directory)!r} is a PEFT adapter, which says nothing about data: give --recipe "
                        "RECIPE to evaluate it on that recipe's eval split.")
    accelerator = Accelerator()
    recipe: Recipe
    recipe, model, tokenizer, label_names = load_trained(directory, model_path, data_recipe)
    split = split or recipe.data.eval_split
    examples = load_split(recipe.data, recipe.task, split, label_names)
    dataset = tokenize_examples(recipe, examples, tokenizer, training=False)
    eval_loader = loader(dataset, tokenizer, recipe.training.eval_batch_size, False, True)
    model, eval_loader = accelerator.prepare(model, eval_loader)
    results = evaluate(model, eval_loader, accelerator, recipe, len(label_names), tokenizer, examples.targets)
    report = {"checkpoint": str(directory), "split": split, "examples": len(examples), "metrics": results}
    if output is not None and accelerator.is_main_process:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2) + "\n")
    finish(accelerator)
    return report
