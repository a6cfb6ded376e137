"""`softprompt validate`: a recipe, its data and its model reference checked without loading the model.

Imports neither torch nor transformers, so that it answers at once.
"""

from __future__ import annotations

import json
from pathlib import Path

from softprompt_cli.config.load import RecipeError, load_recipe
from softprompt_cli.config.schema import Recipe
from softprompt_cli.data.sources import load_examples
from softprompt_cli.errors import UserError
from softprompt_cli.hub import check_model_available, resolve_model_reference

# config.json names of what transformers calls max_position_embeddings (attribute maps), and the keys that hold
# the text part of a composite model's config (PretrainedConfig.get_text_config)
POSITION_KEY = "max_position_embeddings"
# Model types whose transformers config maps n_positions to max_position_embeddings (what training reads);
# elsewhere n_positions means something else (T5's relative attention has no position limit).
N_POSITIONS_TYPES = {"gpt2", "gpt_bigcode", "gptj", "codegen", "openai-gpt", "imagegpt", "decision_transformer"}
TEXT_CONFIG_KEYS = ("text_encoder", "decoder", "generator", "text_config")


def _model_config_file(recipe: Recipe) -> Path | None:
    """The model's config.json, where it is here without downloading: a local or packaged folder, or the local
    Hugging Face cache. None for GGUF models (their config is inside the GGUF file)."""
    spec = recipe.model
    if spec.gguf_file is not None:
        return None
    location, local = resolve_model_reference(spec.name_or_path, spec.revision, spec.gguf_file)
    if local:
        return Path(location) / "config.json"
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(location, "config.json", revision=spec.revision)
    return Path(cached) if isinstance(cached, str) else None


def max_positions(config: dict) -> int | None:
    """The number of positions training will check prompts against (model.loading.Geometry.max_positions),
    from config.json's contents; None where the JSON does not say."""
    nested = [config[key] for key in TEXT_CONFIG_KEYS if isinstance(config.get(key), dict)]
    if len(nested) > 1:
        return None
    text = nested[0] if nested else config
    value = text.get(POSITION_KEY)
    if value is None and text.get("model_type", config.get("model_type")) in N_POSITIONS_TYPES:
        value = text.get("n_positions")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def position_problem(recipe: Recipe) -> str | None:
    """What training will refuse about num_virtual_tokens + data.max_length against the model's positions."""
    config_file = _model_config_file(recipe)
    if config_file is None or not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return (f"model.name_or_path: the model's {str(config_file)!r} is not valid JSON ({err}); transformers "
                "cannot load the model. Restore the model folder's config.json.")
    limit = max_positions(config) if isinstance(config, dict) else None
    wanted = recipe.method.num_virtual_tokens + recipe.data.max_length
    if limit is None or wanted <= limit:
        return None
    return (f"method.num_virtual_tokens ({recipe.method.num_virtual_tokens}) + data.max_length "
            f"({recipe.data.max_length}) = {wanted} exceeds the model's {limit} positions. Lower one of them.")


def output_problem(directory: str) -> str | None:
    """What training will refuse about output.dir: a file where the folder is to be (or is to be made)."""
    path = Path(directory)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None or existing.is_dir():
        return None
    where = "is a file" if existing == path else f"is inside {str(existing)!r}, which is a file"
    return (f"output.dir: {directory!r} {where}, not a folder. Set output.dir to a folder (it is created if "
            "missing), or move the file away.")


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
    else:
        problems.append(position_problem(loaded))
    problems.append(output_problem(loaded.output.dir))
    problems = [problem for problem in problems if problem]
    if problems:
        raise RecipeError(f"recipe {str(path)!r}", problems)
    return (f"{path}: OK ({loaded.method.name}, {len(train_examples)} train / {len(eval_examples)} eval examples, "
            + (f"labels {names}, " if names else "") + f"metrics {', '.join(loaded.metrics)})")
