"""`softprompt validate`: a recipe, its data and its model reference checked without loading the model.

Imports neither torch nor transformers, so that it answers at once.
"""

from __future__ import annotations

from pathlib import Path

from softprompt_cli.config.load import RecipeError, load_recipe
from softprompt_cli.data.sources import load_examples
from softprompt_cli.errors import UserError
from softprompt_cli.hub import check_model_available


def validate_recipe(path: Path, overrides: list[str] | None) -> str:
    """A one-line description of the valid recipe; every problem found at once in a RecipeError otherwise."""
    loaded = load_recipe(path, overrides)
    problems = []
    try:
        train_examples, eval_examples, names = load_examples(loaded.data, loaded.task)
    except UserError as err:
        problems.append(f"data: {err}")
    try:
        check_model_available(loaded.model.name_or_path, loaded.model.revision, loaded.model.gguf_file)
    except UserError as err:
        problems.append(f"model.name_or_path: {err}")
    if problems:
        raise RecipeError(f"recipe {str(path)!r}", problems)
    return (f"{path}: OK ({loaded.method.name}, {len(train_examples)} train / {len(eval_examples)} eval examples, "
            + (f"labels {names}, " if names else "") + f"metrics {', '.join(loaded.metrics)})")
