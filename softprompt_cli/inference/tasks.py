"""Trained soft prompts loaded onto one shared frozen base model, one Task per task they serve: what `predict`
and `serve` answer with.

A multi-task checkpoint serves each of its tasks (named by its recipe, or NAME/TASK given NAME=DIR), all on
its one SoftPromptModel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from softprompt_cli import precision
from softprompt_cli.assemble import Trained, attach_trained, load_frozen, read_trained
from softprompt_cli.config.schema import SINGLE_TASK, Recipe
from softprompt_cli.errors import UserError
from softprompt_cli.model.soft_prompt import SoftPromptModel


@dataclass
class Task:
    name: str
    recipe: Recipe
    label_names: list[str]
    model: SoftPromptModel
    head_state: dict[str, torch.Tensor]
    knows_its_texts: bool = True
    """False for PEFT adapters: they do not record how many texts a row has."""
    model_task: str = SINGLE_TASK
    """The task's name in its model (a multi-task checkpoint's task, whose head and prompt it picks)."""
    checkpoint: int = 0
    """Which loaded checkpoint it comes from: the tasks of one causal_lm model can share its forward passes."""
    precision: str = "no"
    """The autocast `predict` runs its batches under (no, bf16, fp16; see softprompt_cli.precision); serve's engine
    runs float32 whatever it says."""
    prompt: torch.Tensor = field(init=False)
    """The prompt's inference form, computed once (P-tuning's encoder output, projected prefixes)."""

    @property
    def batch_key(self) -> tuple:
        if self.model.causal_lm:  # generation lengths are per task; label words are routed by task id
            return ("causal_lm", self.checkpoint, self.name if self.generates else "", self.precision)
        return (self.model.kind, self.model.num_virtual_tokens, self.model.insert_at,
                self.model.head_reads_model_pooler, self.precision)

    @property
    def device(self) -> torch.device:
        """Where its (shared) base model runs."""
        return next(self.model.base.parameters()).device

    @property
    def task_id(self) -> int:
        return self.model.task_index(self.model_task)

    @property
    def generates(self) -> bool:
        return self.recipe.task.target_field is not None

    @property
    def separate_pair(self) -> bool:
        return self.recipe.task.pooling == "pair_mean"


def parse_reference(reference: str) -> tuple[str | None, Path]:
    name, sep, path = reference.partition("=")
    return (name, Path(path)) if sep and name and not Path(reference).exists() else (None, Path(reference))


def served_names(name: str | None, directory: Path, trained: Trained) -> dict[str, str]:
    """Each task the checkpoint serves, by the name rows give it -> its name in the model."""
    if not trained.recipe.is_multitask:
        return {name or (directory.parent.name if directory.name in ("best", "final") else directory.name):
                SINGLE_TASK}
    return {f"{name}/{task}" if name else task: task for task in trained.task_labels}


def refuse_mixed(loaded: list[Trained], what: str = "predict") -> None:
    """Checkpoints served together: one kind of task, one base model."""
    if len({t.recipe.model_task.type for t in loaded}) > 1:
        raise UserError(f"the checkpoints mix causal_lm and sequence_classification tasks; {what} each kind "
                        "separately.")
    if len({t.base_model["fingerprint"] for t in loaded}) > 1:
        models = sorted({t.base_model["name_or_path"] for t in loaded})
        raise UserError(f"the checkpoints were trained on different base models ({', '.join(models)}); "
                        f"{what} serves checkpoints of one base model at a time.")
    refuse_other_weights(loaded[0], loaded[1:], what)


def base_weights(trained: Trained) -> dict[str, str | None]:
    """How a checkpoint loads its base model's weights, beyond the architecture its fingerprint covers."""
    spec = trained.recipe.model
    return {"model.dtype": spec.dtype, "model.gguf_file": spec.gguf_file, "model.revision": spec.revision}


def refuse_other_weights(first: Trained, others: list[Trained], what: str) -> None:
    """Checkpoints share one loaded base model, so they must load it alike: otherwise all would run on the first
    one's (its dtype, its GGUF quantization), and the results would depend on the order they were given in."""
    expected = base_weights(first)
    for other in others:
        differ = {key: value for key, value in base_weights(other).items() if value != expected[key]}
        if differ:
            key = next(iter(differ))
            raise UserError(f"the checkpoints load their base model differently ({key}: {expected[key]} in "
                            f"{str(first.directory)!r}, {differ[key]} in {str(other.directory)!r}); {what} runs "
                            "one copy of the base model for all of them. Give checkpoints that agree, or run them "
                            "separately.")


def _read_named(references: list[str], model_path: str | None) -> list[tuple[Trained, dict[str, str]]]:
    """Each checkpoint (`DIR` or `NAME=DIR`) read, with the tasks it serves (see `_served_names`); task names
    unique, one kind of task, one base model."""
    loaded: list[tuple[Trained, dict[str, str]]] = []
    taken: set[str] = set()
    for reference in references:
        name, directory = parse_reference(reference)
        trained = read_trained(directory, model_path)
        names = served_names(name, directory, trained)
        clash = sorted(taken & set(names))
        if clash:
            raise UserError(f"two checkpoints have the same task name ({', '.join(map(repr, clash))}); name them: "
                            "NAME=DIR (a multi-task checkpoint's tasks are then NAME/TASK).")
        taken |= set(names)
        loaded.append((trained, names))
    refuse_mixed([t for t, _ in loaded])
    return loaded


def load_shared_base(loaded: list[Trained], device: torch.device | None = None) -> tuple[torch.nn.Module, Any]:
    """The frozen base model and tokenizer that checkpoints of one base model share, in eval mode, on `device`
    (None: the CPU)."""
    first = loaded[0]
    own_head = [t for t in loaded if t.recipe.model_task.pooling == "model"]
    # A multi-task checkpoint has no label_names of its own: its first task's labels size the base model's head.
    base, tokenizer = load_frozen(first.recipe, next(iter((own_head or [first])[0].task_labels.values())),
                                  pooling="model" if own_head else "mean")
    return base.eval().to(device or torch.device("cpu")), tokenizer


def attach_tasks(trained: Trained, names: dict[str, str], number: int, base: torch.nn.Module,
                 tokenizer: Any, precision_option: str = "checkpoint") -> dict[str, Task]:
    """A checkpoint's tasks (`names`: served name -> its name in the model) on the shared base model; `number`
    tells checkpoints apart (the tasks of one causal_lm checkpoint share forward passes); `precision_option`:
    checkpoint (the precision it trained in), fp32 or bf16."""
    model, head_state = attach_trained(trained, base, tokenizer)
    runs_in = precision.for_inference(precision_option, trained.recipe.training.mixed_precision,
                                      next(base.parameters()).device)
    recipes = dict(trained.recipe.task_recipes())
    tasks = {}
    for name, model_task in names.items():
        task = Task(name, recipes[model_task], trained.task_labels[model_task], model, head_state,
                    not trained.from_peft, model_task, number, runs_in)
        with torch.no_grad():
            task.prompt = model.task_prompt(model_task)
        tasks[name] = task
    return tasks


def load_tasks(references: list[str], model_path: str | None = None, precision_option: str = "checkpoint",
               device: torch.device | None = None) -> tuple[dict[str, Task], Any]:
    """Load checkpoints (`DIR` or `NAME=DIR`) onto one shared frozen base model on `device` (None: the CPU): one
    Task per task they serve (a multi-task checkpoint: one per task of it, all on its one model), each predicting
    in the precision `precision_option` gives it (checkpoint: the one it trained in)."""
    loaded = _read_named(references, model_path)
    base, tokenizer = load_shared_base([trained for trained, _ in loaded], device)
    tasks = {}
    for number, (trained, names) in enumerate(loaded):
        tasks.update(attach_tasks(trained, names, number, base, tokenizer, precision_option))
    return tasks, tokenizer
