"""Reading recipes: YAML files, dotted `key=value` overrides, and validation errors a person can act on."""

from __future__ import annotations

import difflib
import os
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from softprompt_cli.config.schema import Recipe, recipe_class
from softprompt_cli.errors import UserError
from softprompt_cli.methods.base import MethodOptions, registry


class RecipeError(UserError):
    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        listing = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source} has {len(problems)} problem(s):\n{listing}")


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe file {str(path)!r} does not exist. Check the path (recipes ship in recipes/).")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise UserError(f"recipe {str(path)!r} is not UTF-8 text: byte {raw[err.start]:#04x} on line {line} cannot "
                        "be decoded (saved as Latin-1 / Windows-1252, or not a text file). Re-save the recipe as "
                        "UTF-8.") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        where = ""
        mark = getattr(err, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(err, "problem", None) or str(err)
        raise UserError(f"recipe {str(path)!r} is not valid YAML{where}: {problem}. Fix the syntax there.") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"recipe {str(path)!r} must be a YAML mapping (key: value), not a {type(data).__name__}.")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; values are parsed as YAML (numbers, booleans, lists)."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise UserError(f"override {override!r} is not of the form key=value (e.g. training.lr=3e-3).")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, dict) and not raw.lstrip().startswith("{"):
            value = raw  # "Question: {text}" is a template, not a mapping; {a: 1} stays one
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            where: Any = _list_index(node, part, key) if isinstance(node, list) else part
            child = node[where] if isinstance(node, list) else node.get(part)
            if not isinstance(child, (dict, list)):
                child = node[where] = {}
            node = child
        node[_list_index(node, parts[-1], key) if isinstance(node, list) else parts[-1]] = value
    return data


def _list_index(entries: list, part: str, key: str) -> int:
    """The entry a dotted key's part names in a list (tasks.0.data.max_length: the first task)."""
    if not part.isdecimal() or int(part) >= len(entries):
        raise UserError(f"override {key!r}: {part!r} is not an entry of that list, which has {len(entries)} "
                        f"entries; name one by its position, 0 to {len(entries) - 1} (e.g. tasks.0.data.max_length)"
                        ".")
    return int(part)


def absolute_path(path: str) -> str:
    """`path` made absolute against the current working directory (`~` expanded); '' and URLs stay as they are."""
    if not path or "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def resolve_paths(recipe: Recipe) -> Recipe:
    """Make the recipe's paths (data.dir, data.files, every task's, method.init_checkpoint, distillation teachers)
    absolute against the current working directory, so that the recipe saved with a run works from any folder.
    Unset paths stay unset ($GLUE_DIR and the Hub remain the fallbacks)."""
    for data in [recipe.data] if recipe.data is not None else [entry.data for entry in recipe.tasks]:
        if data.dir is not None:
            data.dir = absolute_path(data.dir)
        if data.files is not None:
            data.files = {split: absolute_path(path) for split, path in data.files.items()}
    if getattr(recipe.method, "init_checkpoint", None):
        recipe.method.init_checkpoint = absolute_path(recipe.method.init_checkpoint)
    if recipe.distillation is not None:
        recipe.distillation.teachers = {task: absolute_path(folder)
                                        for task, folder in recipe.distillation.teachers.items()}
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """A recipe file with its overrides; relative data paths are resolved against the current working directory
    (not the recipe's folder: recipes are run from the repository root) and kept absolute."""
    data = apply_overrides(read_yaml(path), overrides or [])
    recipe = resolve_paths(parse_recipe(data, source=f"recipe {str(path)!r}"))
    if recipe.output.dir is None:
        recipe.output.dir = str(Path("runs") / Path(path).stem)
    return recipe


def parse_recipe(data: dict[str, Any], source: str = "recipe") -> Recipe:
    cls = recipe_class()
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        problems = format_validation_errors(err, cls)
        if isinstance(data, dict) and "data" not in data and "tasks" not in data:
            # data is optional only in favour of tasks; field errors stop the check that says so
            where = next((i for i, p in enumerate(problems) if not p.startswith("model")), len(problems))
            problems.insert(where, "data: required, but missing (or tasks, for a multi-task recipe)")
        raise RecipeError(source, problems) from None


_METHOD = object()  # marks the method union while walking a location


def _model_in(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """(the model class an annotation holds, whether it holds it inside a list or dict): `DataSection | None`,
    `list[TaskEntry] | None`; (None, False) for anything else."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    for arg in typing.get_args(annotation):
        container = typing.get_origin(arg) in (list, dict)
        inner = typing.get_args(arg)[-1] if container and typing.get_args(arg) else arg
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            return inner, container
    return None, False


def _fields_at(cls: type[BaseModel], loc: tuple) -> list[str]:
    """The field names allowed at `loc` (for 'did you mean'); a list entry's index (tasks, 0) is stepped over."""
    model: Any = cls
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        if model is _METHOD:
            model = registry().get(part)
            continue
        field = model.model_fields.get(part) if model is not None else None
        if field is None:
            return []
        if part == "method" and model is cls:
            model = _METHOD
            continue
        model, contained = _model_in(field.annotation)
        if model is None or (contained and not parts):
            return []
        if contained:
            parts.pop(0)
    if model is _METHOD:
        return ["name", *MethodOptions.model_fields]
    return list(model.model_fields) if model is not None else []


def readable_location(loc: tuple) -> str:
    """A location as a recipe reads: ('tasks', 0, 'data', 'dir') -> tasks[0].data.dir."""
    where = ""
    for part in loc:
        where += f"[{part}]" if isinstance(part, int) else f".{part}" if where else str(part)
    return where or "recipe"


def format_validation_errors(err: ValidationError, cls: type[BaseModel]) -> list[str]:
    problems = []
    methods = registry()
    for error in err.errors():
        loc = tuple(error["loc"])
        # A discriminated union puts the tag in the location: method.p_tuning.encoder -> method.encoder.
        if len(loc) > 1 and loc[0] == "method" and loc[1] in methods:
            field_loc = (loc[0], *loc[2:])
            allowed_loc = loc[:-1]
        else:
            field_loc = loc
            allowed_loc = loc[:-1]
        where = readable_location(field_loc)
        kind = error["type"]
        value = error.get("input")
        if kind == "extra_forbidden":
            allowed = _fields_at(cls, allowed_loc)
            guess = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = (f" (did you mean {guess[0]!r}?)" if guess
                    else f" (allowed: {', '.join(allowed)})" if allowed else "")
            problems.append(f"{where}: unknown key{hint}")
        elif kind == "missing":
            problems.append(f"{where}: required, but missing")
        elif kind == "literal_error":
            expected = error["ctx"]["expected"].replace("'", "").replace(" or ", ", ")
            problems.append(f"{where}: {value!r} is not one of {expected}")
        elif kind == "union_tag_invalid":
            problems.append(f"{where}.name: {error['ctx']['tag']!r} is not one of {', '.join(methods)}")
        elif kind == "union_tag_not_found":
            problems.append(f"{where}.name: required, one of {', '.join(methods)}")
        elif kind == "value_error":
            problems.append(f"{where}: {str(error['ctx']['error'])}")
        else:
            problems.append(f"{where}: {error['msg']} (got {value!r})")
    return problems
