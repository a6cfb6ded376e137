"""The soft prompts a server answers with: one frozen base model and tokenizer loaded once, and every loaded
task on it, by name. Loading and unloading change only the name table (under a lock); a request keeps the Task it
was given, so unloading never breaks a request in flight."""

from __future__ import annotations

import copy
import itertools
import threading
from pathlib import Path

import torch

from softprompt_cli.artifacts.checkpoint import INFO_FILE, RECIPE_FILE
from softprompt_cli.artifacts.peft import is_peft_adapter
from softprompt_cli.assemble import Trained, read_trained
from softprompt_cli.errors import UserError
from softprompt_cli.inference.tasks import (
    Task,
    attach_tasks,
    load_shared_base,
    parse_reference,
    refuse_mixed,
    refuse_other_weights,
    served_names,
)
from softprompt_cli.model import lm
from softprompt_cli.model.loading import Geometry
from softprompt_cli.model.soft_prompt import SoftPromptModel

RUN_CHECKPOINTS = ("best", "final")
"""A training run's folder holds these checkpoints; serving the run serves the first that exists."""


class OutsideRoot(Exception):
    """A hot-loaded checkpoint reaches outside the admin root."""


def is_checkpoint(folder: Path) -> bool:
    return (folder / RECIPE_FILE).is_file() or (folder / INFO_FILE).is_file() or is_peft_adapter(folder)


def _run_checkpoint(folder: Path) -> Path | None:
    """The checkpoint a folder stands for: a run's best/ (else final/), or itself."""
    run = next((folder / name for name in RUN_CHECKPOINTS if is_checkpoint(folder / name)), None)
    return run or (folder if is_checkpoint(folder) else None)


def expand_reference(reference: str) -> list[tuple[str | None, Path]]:
    """(name or None, checkpoint folder) for `DIR`, `NAME=DIR`, a run folder (its best/ checkpoint) or a folder
    of checkpoints or runs (each by its folder's name)."""
    name, folder = parse_reference(reference)
    if not folder.is_dir():
        raise UserError(f"{str(folder)!r} is not a folder. Give checkpoint folders (a run's best/ or final/), "
                        "NAME=DIR, PEFT adapter folders, or a folder holding such folders.")
    checkpoint = _run_checkpoint(folder)
    if checkpoint is not None:
        return [(name or (folder.name if checkpoint != folder else None), checkpoint)]
    found = [(child.name, _run_checkpoint(child)) for child in sorted(folder.iterdir()) if child.is_dir()]
    found = [(child, path) for child, path in found if path is not None]
    if not found:
        raise UserError(f"{str(folder)!r} holds no checkpoint: no {RECIPE_FILE} or PEFT adapter_config.json in it, "
                        "its best/ or final/, or its subfolders. Point at a run's best/ folder, a PEFT adapter, or "
                        "a folder of them.")
    return [(f"{name}/{child}" if name else child, path) for child, path in found]


def read_servable(folder: Path, model_path: str | None) -> Trained:
    """A checkpoint read for serving: never one whose model runs code from its folder (a server's loads are
    driven by requests, so remote code stays off whatever the recipe said)."""
    trained = read_trained(folder, model_path)
    if trained.recipe.model.trust_remote_code:
        raise UserError(f"checkpoint {str(folder)!r} needs model.trust_remote_code, and serve never runs a "
                        "model's own code. Use predict for it, or a model transformers supports natively.")
    return trained


class Registry:
    def __init__(self, references: list[str], model_path: str | None = None, device: torch.device | None = None):
        named = [pair for reference in references for pair in expand_reference(reference)]
        read = [(name, folder, read_servable(folder, model_path)) for name, folder in named]
        refuse_mixed([trained for _, _, trained in read], "serve")
        self.model_path = model_path
        self.base, self.tokenizer = load_shared_base([trained for _, _, trained in read], device)
        first = read[0][2]
        self.first = first
        """The first checkpoint: every later one must load the shared base model as it does."""
        self.base_model = dict(first.base_model)
        self.causal_lm = first.recipe.model_task.type == "causal_lm"
        self.stop_ids = lm.stop_token_ids(self.base, self.tokenizer)
        self._lock = threading.Lock()
        self._numbers = itertools.count()
        self.tasks: dict[str, Task] = {}
        self.runner: SoftPromptModel | None = None
        """A model to run requests for the base model alone (any loaded soft prompt's: they share the base)."""
        for name, folder, trained in read:
            self._attach(name, folder, trained)

    @property
    def max_positions(self) -> int | None:
        return Geometry.of(self.base.config).max_positions

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    @property
    def base_name(self) -> str:
        return self.base_model["name_or_path"]

    def _attach(self, name: str | None, folder: Path, trained: Trained, tokenizer=None) -> list[str]:
        """Attach a checkpoint's tasks to the shared base (`tokenizer`: a private copy of the shared one to build
        them with, when requests may be tokenizing concurrently)."""
        if (trained.recipe.model_task.type == "causal_lm") != self.causal_lm:
            kind = "causal_lm" if self.causal_lm else "sequence_classification"
            raise UserError(f"checkpoint {str(folder)!r} is not a {kind} checkpoint like the ones this server serves; "
                            "serve each kind of task with its own server.")
        refuse_other_weights(self.first, [trained], "serve")
        names = served_names(name, folder, trained)
        clash = sorted(set(names) & (set(self.tasks) | {self.base_name}))
        if clash:
            raise UserError(f"a soft prompt named {', '.join(map(repr, clash))} is already served. Give the new "
                            "one another name (NAME=DIR, or \"name\" in the load request), or unload the old one.")
        tasks = attach_tasks(trained, names, next(self._numbers), self.base, tokenizer or self.tokenizer)
        with self._lock:
            self.tasks.update(tasks)
            self.runner = self.runner or next(iter(tasks.values())).model
        return list(tasks)

    def load(self, folder: Path, name: str | None = None, root: Path | None = None) -> list[str]:
        """Load a checkpoint (a run folder, a checkpoint or a PEFT adapter) while serving: the names it serves.
        With `root`, the checkpoint and every file in it must lie under root once links are followed
        (OutsideRoot otherwise): a run's best/ or a weights file could link elsewhere."""
        checkpoint = _run_checkpoint(folder) if folder.is_dir() else None
        if checkpoint is None:
            raise UserError(f"{str(folder)!r} is not a checkpoint folder (no {RECIPE_FILE} or PEFT "
                            "adapter_config.json in it or in its best/ or final/).")
        if root is not None:
            outside = [path for path in [checkpoint, *checkpoint.rglob("*")]
                       if not path.resolve().is_relative_to(root.resolve())]
            if outside:
                raise OutsideRoot(f"{str(outside[0])!r} links outside the admin root {str(root)!r}; only "
                                      "checkpoints whose files all lie under it can be loaded.")
        # the tokenizer's call state (truncation, padding) is shared: requests tokenize with it meanwhile
        return self._attach(name or (folder.name if checkpoint != folder else None), checkpoint,
                            read_servable(checkpoint, self.model_path), copy.deepcopy(self.tokenizer))

    def unload(self, name: str) -> None:
        with self._lock:
            if name not in self.tasks:
                raise KeyError(name)
            del self.tasks[name]

    def get(self, name: str) -> Task | None:
        with self._lock:
            return self.tasks.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return list(self.tasks)

