"""`softprompt train`: a recipe (and, to resume, a state folder) in; checkpoints, metrics and a summary out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from softprompt_cli.config.schema import Recipe
from softprompt_cli.training.control import TrainingStopped
from softprompt_cli.training.loop import train

__all__ = ["TrainingStopped", "run_train"]


def run_train(recipe: Recipe, state_dir: Path | None = None) -> dict[str, Any]:
    """Train as the recipe says, from the start or from `state_dir`; TrainingStopped after a Ctrl-C."""
    return train(recipe, state_dir)
