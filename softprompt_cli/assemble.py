"""The only place a SoftPromptModel is made: from a recipe and its labels (training), and from a trained
checkpoint (ours or a PEFT adapter), alone or onto a base model shared with other soft prompts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from softprompt_cli.artifacts.checkpoint import RECIPE_FILE, RETRAIN, damaged_checkpoint, read_prefix_checkpoint
from softprompt_cli.artifacts.peft import (
    ADAPTER_CONFIG,
    REEXPORT,
    is_peft_adapter,
    read_adapter_prompt,
    read_any_checkpoint,
)
from softprompt_cli.config.load import RecipeError, parse_recipe
from softprompt_cli.config.schema import SINGLE_TASK, Recipe
from softprompt_cli.data.batching import label_word_ids
from softprompt_cli.data.templates import label_word_list
from softprompt_cli.errors import UserError
from softprompt_cli.methods.base import SourcePrompt
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
    task_labels: dict[str, list[str]]
    """Each task's label names, in the model's task order (a single-task checkpoint: one task)."""

    @property
    def labels(self) -> list[str] | dict[str, list[str]]:
        """What `build_model` takes: the label names, or each task's of a multi-task checkpoint."""
        return self.task_labels if self.recipe.is_multitask else self.label_names


def _checkpoint_recipe(directory: Path, recipe_yaml: str, fix: str) -> Recipe:
    """The recipe a checkpoint was trained with; YAML that is invalid, unsafe (python tags: safe_load refuses
    them, nothing is executed) or not a recipe is damage."""
    try:
        data = yaml.safe_load(recipe_yaml)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise damaged_checkpoint(directory, f"{RECIPE_FILE} is not valid (safe) YAML{where}: {problem}", fix) from None
    if not isinstance(data, dict):
        raise damaged_checkpoint(directory, f"{RECIPE_FILE} holds a {type(data).__name__}, not a recipe", fix)
    try:
        return parse_recipe(data, source=f"recipe in checkpoint {str(directory)!r}")
    except RecipeError as err:
        raise damaged_checkpoint(directory, f"{RECIPE_FILE} is not a valid recipe ({'; '.join(err.problems)})",
                                 fix) from None


def read_trained(directory: Path, model_path: str | None = None, data_recipe: Recipe | None = None) -> Trained:
    """A checkpoint folder or PEFT adapter; `model_path` replaces the base model's location (same model)."""
    info, recipe_yaml, tensors = read_any_checkpoint(directory, data_recipe, model_path)
    from_peft = info.get("source") == "peft"
    recipe = _checkpoint_recipe(directory, recipe_yaml, REEXPORT if from_peft else RETRAIN)
    if model_path is not None:
        recipe.model.name_or_path = model_path
    task_labels = info.get("tasks") or {SINGLE_TASK: info["label_names"]}
    if list(task_labels) != recipe.task_names or not all(isinstance(v, list) for v in task_labels.values()):
        raise damaged_checkpoint(directory, f"its tasks {list(task_labels)} are not its recipe's "
                                 f"({', '.join(recipe.task_names)})", REEXPORT if from_peft else RETRAIN)
    return Trained(directory, recipe, info["label_names"], info["base_model"], tensors, from_peft, task_labels)


def read_source_prompt(directory: Path, fingerprint: str) -> SourcePrompt:
    """The soft prompt of a checkpoint (ours or a PEFT adapter) that another run starts from, checked to be made
    for the same base model."""
    if not directory.is_dir():
        raise UserError(f"method.init_checkpoint {str(directory)!r} is not a folder. Point it at a source run's "
                        "best/ or final/ folder (or a PEFT adapter folder).")
    if is_peft_adapter(directory):  # its prompt alone: a CAUSAL_LM one needs no recipe
        source, base_model = read_adapter_prompt(directory)
    else:
        trained = read_trained(directory)
        prompt, _ = split_trained(trained.tensors)
        source = SourcePrompt(trained.recipe.method.name, prompt, list(trained.task_labels))
        base_model = trained.base_model
    if base_model["fingerprint"] != fingerprint:
        raise UserError(f"method.init_checkpoint {str(directory)!r} was trained on "
                        f"{base_model['name_or_path']!r} (config fingerprint "
                        f"{base_model['fingerprint']}), not on this recipe's model (fingerprint "
                        f"{fingerprint}). Start from a source checkpoint of the same base model.")
    return source


def load_frozen(recipe: Recipe, label_names: list[str], pooling: str | None = None,
                gradient_checkpointing: bool = False) -> tuple[torch.nn.Module, Any]:
    """The recipe's base model and tokenizer, loaded and prepared for soft prompts (`pooling` overrides the
    recipe's: a base model shared by tasks that read its own head and tasks that do not)."""
    spec, task = recipe.model, recipe.model_task
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
        raise UserError(f"task {recipe.task_names[0]}: {err}" if recipe.task_names[0] != SINGLE_TASK
                        else str(err)) from None


def build_model(recipe: Recipe, labels: list[str] | dict[str, list[str]], base: torch.nn.Module | None = None,
                tokenizer: Any = None, trained: bool = False) -> tuple[SoftPromptModel, Any]:
    """A new soft-prompt model for the recipe (`labels`: its label names, or each task's for a multi-task
    recipe), on its own base model or on a prepared shared one; `trained`: its trained tensors are loaded next,
    so the method's start reads nothing."""
    task_labels = labels if isinstance(labels, dict) else {SINGLE_TASK: labels}
    if base is None:
        base, tokenizer = load_frozen(recipe, next(iter(task_labels.values())),
                                      gradient_checkpointing=recipe.training.gradient_checkpointing)
    task = recipe.model_task
    words = {name: _label_words(task_recipe, tokenizer, task_labels[name])
             for name, task_recipe in recipe.task_recipes()}
    num_labels: int | dict = {name: len(names) for name, names in task_labels.items()}
    if not recipe.is_multitask:
        num_labels, words = num_labels[SINGLE_TASK], words[SINGLE_TASK]
    method = recipe.method.for_trained() if trained else recipe.method
    model = SoftPromptModel(base, method, tokenizer, task.pooling, num_labels, recipe.max_length,
                            task.prompt_position, task.type, words, prefix_from_checkpoint=read_prefix_checkpoint,
                            prompt_from_checkpoint=read_source_prompt)
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


def _refuse_misfit(trained: Trained, model: SoftPromptModel) -> None:
    """Raise the damaged-checkpoint error unless the checkpoint holds exactly the tensors of the model its recipe
    builds, in their shapes. A base model's own head shared by tasks was built for one task's number of labels:
    its label dimension is checked against this checkpoint's label names instead."""
    expected = {name: tuple(t.shape) for name, t in model.trainable_state().items()}
    prefix = model.head_prefix or ""
    shared_labels = model.base.config.num_labels if prefix.startswith("base.") else None
    problems = []
    for name in sorted(set(expected) | set(trained.tensors)):
        if name not in trained.tensors or name not in expected:
            problems.append(f"{name} is {'missing' if name in expected else 'not a tensor of that model'}")
            continue
        want, got = expected[name], tuple(trained.tensors[name].shape)
        if name.startswith(prefix) and shared_labels is not None and want and want[0] == shared_labels:
            want = (len(trained.label_names), *want[1:])
        if got != want:
            problems.append(f"{name} has shape {list(got)} where the model needs {list(want)}")
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        source = ADAPTER_CONFIG if trained.from_peft else RECIPE_FILE
        raise damaged_checkpoint(trained.directory, f"its tensors do not fit the model its {source} describes "
                                 f"({shown})", REEXPORT if trained.from_peft else RETRAIN)


def model_from_trained(trained: Trained) -> tuple[SoftPromptModel, Any]:
    """A checkpoint already read, on its own base model: (model, tokenizer)."""
    model, tokenizer = build_model(trained.recipe, trained.labels, trained=True)
    check_base_model(trained, model.base)
    _refuse_misfit(trained, model)
    model.load_trainable_state(trained.tensors)
    return model, tokenizer


def load_trained(directory: Path, model_path: str | None = None, data_recipe: Recipe | None = None):
    """(recipe, model, tokenizer, label names) of a checkpoint (or PEFT adapter) on its own base model."""
    trained = read_trained(directory, model_path, data_recipe)
    model, tokenizer = model_from_trained(trained)
    return trained.recipe, model, tokenizer, trained.label_names


def attach_trained(trained: Trained, base: torch.nn.Module, tokenizer: Any
                   ) -> tuple[SoftPromptModel, dict[str, torch.Tensor]]:
    """A checkpoint's soft prompt on a base model shared with others, in eval mode, and its head weights (the
    model's own head is shared too, so each task's head weights are passed at call time, not loaded into it)."""
    check_base_model(trained, base)
    model, _ = build_model(trained.recipe, trained.labels, base, tokenizer, trained=True)
    _refuse_misfit(trained, model)
    device = next(base.parameters()).device
    for child in model.children():
        if child is not base:  # moving the shared base would touch what other soft prompts are running on
            child.to(device)
    if model.multitask:  # its heads are its own modules, not the shared base model's
        model.load_trainable_state(trained.tensors)
        return model.eval(), {}
    prompt_state, _ = split_trained(trained.tensors)
    model.prompt.load_state_dict(prompt_state)
    return model.eval(), {k: v.to(device) for k, v in model.head_state(trained.tensors).items()}
