"""The only place a SoftPromptModel is made: from a recipe and its labels (training), and from a trained
checkpoint (ours or a PEFT adapter), alone or onto a base model shared with other soft prompts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from softprompt_cli.artifacts.checkpoint import read_prefix_checkpoint
from softprompt_cli.artifacts.peft import read_any_checkpoint
from softprompt_cli.config.load import parse_recipe
from softprompt_cli.config.schema import Recipe
from softprompt_cli.data.batching import label_word_ids
from softprompt_cli.data.templates import label_word_list
from softprompt_cli.errors import UserError
from softprompt_cli.model.loading import config_fingerprint, load_base_model, load_tokenizer, prepare_frozen
from softprompt_cli.model.soft_prompt import SoftPromptModel, split_trained


@dataclass
class Trained:
    """A trained checkpoint, read and parsed, before any model is built."""

    directory: Path
    recipe: Recipe
    label_names: list[str]
    base_model: dict[str, Any]
    """name_or_path and config fingerprint of the model it was trained on."""
    tensors: dict[str, torch.Tensor]
    from_peft: bool


def read_trained(directory: Path, model_path: str | None = None, data_recipe: Recipe | None = None) -> Trained:
    """A checkpoint folder or PEFT adapter; `model_path` replaces the base model's location (same model)."""
    info, recipe_yaml, tensors = read_any_checkpoint(directory, data_recipe)
    recipe = parse_recipe(yaml.safe_load(recipe_yaml), source=f"recipe in checkpoint {str(directory)!r}")
    if model_path is not None:
        recipe.model.name_or_path = model_path
    return Trained(directory, recipe, info["label_names"], info["base_model"], tensors, info.get("source") == "peft")


def load_frozen(recipe: Recipe, label_names: list[str], pooling: str | None = None,
                gradient_checkpointing: bool = False) -> tuple[torch.nn.Module, Any]:
    """The recipe's base model and tokenizer, loaded and prepared for soft prompts (`pooling` overrides the
    recipe's: a base model shared by tasks that read its own head and tasks that do not)."""
    spec, task = recipe.model, recipe.task
    tokenizer = load_tokenizer(spec.name_or_path, spec.revision, spec.trust_remote_code, spec.gguf_file)
    base = load_base_model(spec.name_or_path, revision=spec.revision, dtype=spec.dtype,
                           trust_remote_code=spec.trust_remote_code, pooling=pooling or task.pooling,
                           label_names=label_names, task_type=task.type, gguf_file=spec.gguf_file)
    prepare_frozen(base, tokenizer, task.type, pooling or task.pooling, gradient_checkpointing)
    return base, tokenizer


def _label_words(recipe: Recipe, tokenizer, label_names: list[str]) -> list[list[int]] | None:
    if recipe.task.type != "causal_lm" or recipe.task.label_words is None:
        return None
    try:
        return label_word_ids(tokenizer, label_word_list(recipe.task.label_words, label_names), label_names)
    except ValueError as err:
        raise UserError(str(err)) from None


def build_model(recipe: Recipe, label_names: list[str], base: torch.nn.Module | None = None,
                tokenizer: Any = None) -> tuple[SoftPromptModel, Any]:
    """A new soft-prompt model for the recipe, on its own base model or on a prepared shared one."""
    if base is None:
        base, tokenizer = load_frozen(recipe, label_names,
                                      gradient_checkpointing=recipe.training.gradient_checkpointing)
    task = recipe.task
    model = SoftPromptModel(base, recipe.method, tokenizer, task.pooling, len(label_names), recipe.data.max_length,
                            task.prompt_position, task.type, _label_words(recipe, tokenizer, label_names),
                            prefix_from_checkpoint=read_prefix_checkpoint)
    return model, tokenizer


def check_base_model(trained: Trained, base: torch.nn.Module) -> None:
    """Refuse a base model other than the one the checkpoint was trained on."""
    expected = trained.base_model["fingerprint"]
    actual = config_fingerprint(base.config)
    if actual != expected:
        raise UserError(
            f"checkpoint {str(trained.directory)!r} was trained on {trained.base_model['name_or_path']!r} (config "
            f"fingerprint {expected}), but {trained.recipe.model.name_or_path!r} has fingerprint {actual}: a "
            "different model. Use the base model the checkpoint was trained on."
        )


def load_trained(directory: Path, model_path: str | None = None, data_recipe: Recipe | None = None):
    """(recipe, model, tokenizer, label names) of a checkpoint (or PEFT adapter) on its own base model."""
    trained = read_trained(directory, model_path, data_recipe)
    model, tokenizer = build_model(trained.recipe, trained.label_names)
    check_base_model(trained, model.base)
    model.load_trainable_state(trained.tensors)
    return trained.recipe, model, tokenizer, trained.label_names


def attach_trained(trained: Trained, base: torch.nn.Module, tokenizer: Any
                   ) -> tuple[SoftPromptModel, dict[str, torch.Tensor]]:
    """A checkpoint's soft prompt on a base model shared with others, in eval mode, and its head weights (the
    model's own head is shared too, so each task's head weights are passed at call time, not loaded into it)."""
    check_base_model(trained, base)
    model, _ = build_model(trained.recipe, trained.label_names, base, tokenizer)
    prompt_state, _ = split_trained(trained.tensors)
    try:
        model.prompt.load_state_dict(prompt_state)
    except RuntimeError as err:
        raise UserError(f"checkpoint {str(trained.directory)!r} does not fit its own recipe ({err}).") from None
    return model.eval(), model.head_state(trained.tensors)
