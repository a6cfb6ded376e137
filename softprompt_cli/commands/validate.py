"""`softprompt validate`: a recipe, its data and its model reference checked without loading the model.

Imports neither torch nor transformers, so that it answers at once.
"""

from __future__ import annotations

import json
from pathlib import Path

from softprompt_cli.commands.arguments import PEFT_ADAPTER_CONFIG
from softprompt_cli.config.load import RecipeError, load_recipe
from softprompt_cli.config.schema import SINGLE_TASK, Recipe
from softprompt_cli.data.sources import load_examples
from softprompt_cli.errors import UserError
from softprompt_cli.hub import check_model_available, resolve_model_reference
from softprompt_cli.methods.base import MethodOptions

# config.json names of what transformers calls max_position_embeddings (attribute maps), and the keys that hold
# the text part of a composite model's config (PretrainedConfig.get_text_config)
POSITION_KEY = "max_position_embeddings"
# Model types whose transformers config maps n_positions to max_position_embeddings (what training reads);
# elsewhere n_positions means something else (T5's relative attention has no position limit).
N_POSITIONS_TYPES = {"gpt2", "gpt_bigcode", "gptj", "codegen", "openai-gpt", "imagegpt", "decision_transformer"}
TEXT_CONFIG_KEYS = ("text_encoder", "decoder", "generator", "text_config")
# artifacts.checkpoint's WEIGHTS_FILE, INFO_FILE and RECIPE_FILE: that module imports torch
CHECKPOINT_FILES = ("softprompt.safetensors", "checkpoint.json", "recipe.yaml")
# Named, not imported: importing a method module before the registry has loaded them all would leave it with one.
MPT = "multitask_prompt_tuning"


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
    """What training will refuse about num_virtual_tokens + the longest data.max_length against the model's
    positions (every task of a multi-task recipe runs through the one model)."""
    config_file = _model_config_file(recipe)
    if config_file is None or not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return (f"model.name_or_path: the model's {str(config_file)!r} is not valid JSON ({err}); transformers "
                "cannot load the model. Restore the model folder's config.json.")
    limit = max_positions(config) if isinstance(config, dict) else None
    wanted = recipe.method.num_virtual_tokens + recipe.max_length
    if limit is None or wanted <= limit:
        return None
    longest = next(name for name, task in recipe.task_recipes() if task.data.max_length == recipe.max_length)
    where = f"tasks.{longest}.data.max_length" if recipe.is_multitask else "data.max_length"
    return (f"method.num_virtual_tokens ({recipe.method.num_virtual_tokens}) + {where} ({recipe.max_length}) = "
            f"{wanted} exceeds the model's {limit} positions. Lower one of them.")


def output_problem(directory: str) -> str | None:
    """What training will refuse about output.dir: a file where the folder is to be (or is to be made)."""
    path = Path(directory)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None or existing.is_dir():
        return None
    where = "is a file" if existing == path else f"is inside {str(existing)!r}, which is a file"
    return (f"output.dir: {directory!r} {where}, not a folder. Set output.dir to a folder (it is created if "
            "missing), or move the file away.")


def checkpoint_problem(where: str, folder: str) -> tuple[str | None, dict]:
    """(what training will refuse about a checkpoint folder that a recipe reads, the folder's checkpoint.json):
    a missing folder, or one that is not a checkpoint. File checks only: reading the weights needs torch."""
    path = Path(folder)
    fix = "Give a best/ or final/ folder written by `softprompt train`."
    if not path.is_dir():
        return f"{where}: {folder!r} {'is a file, not a folder' if path.exists() else 'does not exist'}. {fix}", {}
    if (path / PEFT_ADAPTER_CONFIG).is_file():
        return None, {}
    missing = [name for name in CHECKPOINT_FILES if not (path / name).is_file()]
    if missing:
        what = "is not a checkpoint folder" if len(missing) == len(CHECKPOINT_FILES) else "is an incomplete checkpoint"
        return f"{where}: {folder!r} {what} (it has no {', '.join(missing)}). {fix}", {}
    try:
        info = json.loads((path / CHECKPOINT_FILES[1]).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"{where}: {folder!r} is damaged ({CHECKPOINT_FILES[1]} is not valid JSON: {err}). {fix}", {}
    return None, info if isinstance(info, dict) else {}


def _checkpoint_tasks(info: dict) -> list[str]:
    tasks = info.get("tasks")
    return list(tasks) if isinstance(tasks, dict) else [SINGLE_TASK]


def _source_problem(method: MethodOptions) -> str | None:
    """What MPT's start will refuse about its init_checkpoint, as far as files and checkpoint.json tell."""
    where = "method.init_checkpoint"
    problem, info = checkpoint_problem(where, method.init_checkpoint)
    if problem or not info:
        return problem
    kind = info["method"].get("name") if isinstance(info.get("method"), dict) else None
    allowed = (method.name, "prompt_tuning") if method.init == "source_shared" else (method.name,)
    if isinstance(kind, str) and kind not in allowed:  # no name at all: damage, which training reports
        return (f"{where}: {method.init_checkpoint!r} is a {kind} checkpoint; init: {method.init} needs a "
                f"{' or '.join(allowed)} checkpoint. Point it at a source run's best/ or final/.")
    tasks = _checkpoint_tasks(info)
    if method.init == "source_task" and method.init_task not in tasks:
        return (f"method.init_task: {method.init_task!r} is not a task of {where} {method.init_checkpoint!r} (its "
                f"tasks: {', '.join(tasks)}). Name one of them.")
    return None


def checkpoint_problems(recipe: Recipe) -> list[str | None]:
    """What training will refuse about the checkpoints the recipe reads: MPT's source, distillation's teachers."""
    problems: list[str | None] = []
    if recipe.method.name == MPT and recipe.method.init_checkpoint:
        problems.append(_source_problem(recipe.method))
    for task, folder in (recipe.distillation.teachers if recipe.distillation else {}).items():
        where = f"distillation.teachers.{task}"
        problem, info = checkpoint_problem(where, folder)
        if problem is None and _checkpoint_tasks(info) != [SINGLE_TASK]:
            problem = (f"{where}: {folder!r} is a multi-task checkpoint; a teacher is a single-task checkpoint of "
                       f"task {task}. Train one with that task's single-task recipe.")
        problems.append(problem)
    return problems


def data_problems(recipe: Recipe) -> tuple[list[str], list[str]]:
    """(problems, one summary per task) of reading every task's data as training will."""
    problems, summaries = [], []
    for name, task in recipe.task_recipes():
        try:
            train_examples, eval_examples, names = load_examples(task.data, task.task)
        except UserError as err:
            problems.append(f"tasks.{name}.data: {err}" if recipe.is_multitask else f"data: {err}")
            continue
        counts = f"{len(train_examples)} train / {len(eval_examples)} eval examples"
        labels = f"labels {names}, " if names else ""
        summaries.append(f"{name}: {counts}, {labels}main metric {task.main_metric}" if recipe.is_multitask
                         else f"{counts}, {labels}metrics {', '.join(task.metrics)}")
    return problems, summaries


def validate_recipe(path: Path, overrides: list[str] | None) -> str:
    """A one-line description of the valid recipe; every problem found at once in a RecipeError otherwise."""
    loaded = load_recipe(path, overrides)
    problems, summaries = data_problems(loaded)
    try:
        check_model_available(loaded.model.name_or_path, loaded.model.revision, loaded.model.gguf_file)
    except UserError as err:
        problems.append(f"model.name_or_path: {err}")
    else:
        problems.append(position_problem(loaded))
    problems += checkpoint_problems(loaded)
    problems.append(output_problem(loaded.output.dir))
    problems = [problem for problem in problems if problem]
    if problems:
        raise RecipeError(f"recipe {str(path)!r}", problems)
    if not loaded.is_multitask:
        return f"{path}: OK ({loaded.method.name}, {summaries[0]})"
    sampling = loaded.task_sampling
    rule = sampling.rule + (f" {sampling.temperature:g}" if sampling.rule == "temperature" else "")
    return (f"{path}: OK ({loaded.method.name}, {len(summaries)} tasks: {'; '.join(summaries)}; task_sampling {rule}"
            + (", distilled from teachers" if loaded.distillation else "") + f"; best by {loaded.main_metric} "
            "of the tasks' main metrics)")
