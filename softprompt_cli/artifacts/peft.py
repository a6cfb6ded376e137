"""Interop with Hugging Face PEFT's prompt-learning adapters (SEQ_CLS, CAUSAL_LM), both ways, without PEFT.

Export writes `adapter_config.json` + `adapter_model.safetensors` (the prompt's inference form as
`prompt_embeddings`, the head under `base_model.<classifier|score>.*`; multitask prompt tuning: the shared
prompt and every task's factors, `prefix_task_cols` / `prefix_task_rows`) for `PeftModel.from_pretrained`.
Import reads such a folder as a checkpoint (`eval`, `predict`; a CAUSAL_LM adapter, or one of several tasks,
only with a recipe that supplies its template, label words and tasks).
PEFT's layout is reproduced exactly: virtual tokens at the very start, the model's own head.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from softprompt_cli.artifacts.checkpoint import (
    PREFIX_KEY,
    atomic_folder,
    damaged_checkpoint,
    read_checkpoint,
    read_weights,
)
from softprompt_cli.config.schema import SINGLE_TASK, Recipe
from softprompt_cli.data.glue import GLUE_TASKS
from softprompt_cli.data.sources import has_labels, read_split
from softprompt_cli.data.sources import label_names as split_label_names
from softprompt_cli.errors import UserError
from softprompt_cli.methods.base import SourcePrompt
from softprompt_cli.model.loading import Geometry, config_fingerprint, load_config
from softprompt_cli.model.soft_prompt import PROMPT_PREFIX, SoftPromptModel, split_trained
from softprompt_cli.peft_compat import peft_refusal_note

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_TYPES = {"prompt_tuning": "PROMPT_TUNING", "p_tuning": "P_TUNING", "prefix_tuning": "PREFIX_TUNING",
              "multitask_prompt_tuning": "MULTITASK_PROMPT_TUNING"}
MPT = "multitask_prompt_tuning"
MPT_TENSORS = {"embedding": "prompt_embeddings", "task_cols": "prefix_task_cols", "task_rows": "prefix_task_rows"}
"""Our multitask prompt tuning parameters -> PEFT's names; PEFT computes P * (u_k v_k) per row from them too."""
LABELS_FILE = "label_names.json"
TASKS_FILE = "tasks.json"
"""A multi-task export's tasks, {name: label names} in the adapter's task order: PEFT knows tasks by index only."""


def is_peft_adapter(directory: Path) -> bool:
    return (directory / ADAPTER_CONFIG).is_file()


def _refuse_inexpressible(name: str, recipe: Recipe, model: SoftPromptModel) -> None:
    if recipe.model.gguf_file is not None:
        raise UserError(f"checkpoint {name!r} was trained on a GGUF file, which PEFT cannot load as a base "
                        "model. Export checkpoints of models stored as safetensors.")
    task = recipe.model_task
    if recipe.is_multitask and task.type != "causal_lm":
        single = (" (a target run of one task with method.init: source_task from this one)"
                  if recipe.method.name == MPT else "")
        raise UserError(f"checkpoint {name!r} has {len(recipe.task_names)} tasks ({', '.join(recipe.task_names)}), "
                        "each with a classification head of its own, but a PEFT SEQ_CLS adapter holds one classifier "
                        "for all of its tasks, so it cannot hold these heads. Train and export each task as a "
                        f"single-task checkpoint{single}, or train the tasks as task.type: causal_lm, whose tasks "
                        "share the model's own LM head and export together.")
    if task.pooling != "model":
        raise UserError(f"checkpoint {name!r} uses task.pooling: {task.pooling}, a head PEFT does "
                        "not have. Only task.pooling: model checkpoints can be exported to PEFT.")
    if recipe.method.kind == "input" and model.insert_at != 0:
        raise UserError(f"checkpoint {name!r} puts its virtual tokens after [CLS]; PEFT puts them at the "
                        "start, so the exported adapter would compute something else. Train with "
                        "task.prompt_position: start to export to PEFT.")


def _adapter_config(recipe: Recipe, geometry: Geometry) -> dict[str, Any]:
    method = recipe.method
    causal_lm = recipe.model_task.type == "causal_lm"
    prefix = method.kind == "prefix"
    config: dict[str, Any] = {
        "peft_type": PEFT_TYPES[method.name], "task_type": "CAUSAL_LM" if causal_lm else "SEQ_CLS",
        "inference_mode": True, "auto_mapping": None,
        "base_model_name_or_path": recipe.model.name_or_path, "revision": recipe.model.revision,
        "num_virtual_tokens": method.num_virtual_tokens, "num_transformer_submodules": 1,
        "num_layers": geometry.num_layers, "modules_to_save": None if causal_lm else ["classifier", "score"],
        "num_attention_heads": geometry.num_kv_heads if prefix else geometry.num_attention_heads,
        "token_dim": geometry.num_kv_heads * geometry.head_dim if prefix else geometry.hidden_size,
    }
    if method.name in ("prompt_tuning", MPT):
        config |= {"prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None,
                   "tokenizer_kwargs": None}
    if method.name == MPT:  # RANDOM: loading must not read a source state dict; the saved factors replace it
        config |= {"prompt_tuning_init_state_dict_path": None, "prompt_tuning_init_task": 0,
                   "num_ranks": method.rank, "num_tasks": len(recipe.task_names)}
    elif method.name == "p_tuning":
        config |= {"encoder_reparameterization_type": method.encoder.upper(),
                   "encoder_hidden_size": method.encoder_hidden_size, "encoder_num_layers": method.encoder_num_layers,
                   "encoder_dropout": method.encoder_dropout}
    else:  # the projection MLP's output is exported: PEFT sees a prefix without projection
        config |= {"encoder_hidden_size": geometry.hidden_size, "prefix_projection": False, "init_weights": None}
    return config


def _prompt_tensors(recipe: Recipe, model: SoftPromptModel) -> dict[str, torch.Tensor]:
    """The prompt as PEFT saves it: its inference form, or multitask prompt tuning's parameters."""
    if recipe.method.name == MPT:
        return {peft_name: getattr(model.prompt, ours) for ours, peft_name in MPT_TENSORS.items()}
    with torch.no_grad():
        return {"prompt_embeddings": model.prompt.tokens() if recipe.method.kind == "prefix" else model.prompt()}


def write_peft_adapter(out: Path, name: str, recipe: Recipe, model: SoftPromptModel,
                       labels: list[str] | dict[str, list[str]]) -> str | None:
    """Write a trained model as a PEFT adapter folder (`labels`: its label names, or each task's of a multi-task
    model); return what to tell the user where PEFT will refuse to apply it to this base model (else None)."""
    _refuse_inexpressible(name, recipe, model)
    config = write_adapter_files(out, recipe, model, labels)
    return peft_refusal_note(model.base, config["peft_type"], config["task_type"])


def write_adapter_files(out: Path, recipe: Recipe, model: SoftPromptModel,
                        labels: list[str] | dict[str, list[str]]) -> dict:
    """The adapter folder itself, without `write_peft_adapter`'s refusals (for a caller that applies it to the
    very base model in memory, e.g. a GGUF model's dequantized weights in a benchmark); returns its config."""
    _, head = split_trained(model.trainable_state())
    tensors = {**_prompt_tensors(recipe, model),
               **{f"base_model.{k.removeprefix('base.')}": t for k, t in head.items()}}
    config = _adapter_config(recipe, Geometry.of(model.base.config))
    with atomic_folder(out) as staging:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, staging / ADAPTER_WEIGHTS,
                  metadata={"format": "pt"})
        (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        if isinstance(labels, dict):
            (staging / TASKS_FILE).write_text(json.dumps(labels, indent=2) + "\n")
        else:
            (staging / LABELS_FILE).write_text(json.dumps(labels) + "\n")
    return config


REEXPORT = ("Export it again (softprompt export CHECKPOINT OUT --format peft) or save it again with PEFT's "
            "save_pretrained, or use another adapter.")


def _saved_json(directory: Path, name: str) -> Any:
    """A small JSON file an export writes beside the adapter (None where there is none)."""
    path = directory / name
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise damaged_checkpoint(directory, f"{name} is not valid JSON ({err})", REEXPORT) from None


def _is_names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(name, str) for name in value)


def _saved_labels(directory: Path) -> list[str] | None:
    labels = _saved_json(directory, LABELS_FILE)
    if labels is not None and not _is_names(labels):
        raise damaged_checkpoint(directory, f"{LABELS_FILE} is not a list of label names", REEXPORT)
    return labels


def _saved_tasks(directory: Path) -> dict[str, list[str]] | None:
    tasks = _saved_json(directory, TASKS_FILE)
    if tasks is not None and not (isinstance(tasks, dict) and tasks and all(map(_is_names, tasks.values()))):
        raise damaged_checkpoint(directory, f"{TASKS_FILE} is not an object of task names and their label names",
                                 REEXPORT)
    return tasks


def _declared_labels(recipe: Recipe | None) -> list[str] | None:
    if recipe is not None and recipe.data.label_names:
        return list(recipe.data.label_names)
    if recipe is not None and recipe.data.glue_task:
        return list(GLUE_TASKS[recipe.data.glue_task].label_names)
    return None


def _adapter_label_names(directory: Path, num_labels: int, data_recipe: Recipe | None,
                         saved: list[str] | None) -> list[str]:
    """A SEQ_CLS adapter's label names: the recipe's, else those exported with it, else PEFT's LABEL_i."""
    label_names = _declared_labels(data_recipe) or saved or [f"LABEL_{i}" for i in range(num_labels)]
    if len(label_names) != num_labels:
        raise UserError(f"PEFT adapter {str(directory)!r} has {num_labels} classes, the recipe {len(label_names)}. "
                        "Give a recipe (--recipe) whose data has the adapter's labels.")
    return label_names


def _lm_label_names(task_recipe: Recipe, saved: list[str] | None) -> list[str]:
    """A CAUSAL_LM task's label names: the recipe's, else those exported with it, else its train split's (as
    training names them); none for free-form targets."""
    if not has_labels(task_recipe.task):
        return []
    names = _declared_labels(task_recipe) or saved
    if names is None:
        whole = task_recipe.data.model_copy(update={"validation_fraction": None})
        names = split_label_names(whole, read_split(whole, whole.train_split))
    return list(names)


def _read_adapter_config(directory: Path) -> dict[str, Any]:
    """adapter_config.json, checked to be an object with the fields read here."""
    try:
        config = json.loads((directory / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise damaged_checkpoint(directory, f"{ADAPTER_CONFIG} is not valid JSON ({err})", REEXPORT) from None
    if not isinstance(config, dict):
        raise damaged_checkpoint(directory, f"{ADAPTER_CONFIG} holds a JSON {type(config).__name__}, not an object",
                                 REEXPORT)
    n = config.get("num_virtual_tokens")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise damaged_checkpoint(directory, f"{ADAPTER_CONFIG} has no num_virtual_tokens (a positive integer; "
                                 f"got {n!r})", REEXPORT)
    for key in ("base_model_name_or_path", "revision"):
        if not isinstance(config.get(key), (str, type(None))):
            raise damaged_checkpoint(directory, f"{ADAPTER_CONFIG} has a {key} that is not a string", REEXPORT)
    return config


def _read_adapter(directory: Path) -> tuple[dict[str, Any], str, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(adapter config, our method name, all tensors, head tensors) of a PEFT adapter folder we can read."""
    config = _read_adapter_config(directory)
    kind = {v: k for k, v in PEFT_TYPES.items()}.get(config.get("peft_type"))
    task_type = config.get("task_type")
    if kind is None or task_type not in ("SEQ_CLS", "CAUSAL_LM") or config.get("num_transformer_submodules") not in (
            None, 1):
        raise UserError(f"{str(directory)!r} is a PEFT {config.get('peft_type')} {task_type} adapter; softprompt reads "
                        "prompt tuning, P-tuning, prefix tuning and multitask prompt tuning adapters for SEQ_CLS and "
                        "CAUSAL_LM (decoder-only models).")
    if not (directory / ADAPTER_WEIGHTS).is_file():
        if (directory / "adapter_model.bin").is_file():
            raise UserError(f"PEFT adapter {str(directory)!r} is saved as adapter_model.bin (pickle), which softprompt "
                            "never loads. Save it with PEFT's save_pretrained(..., safe_serialization=True).")
        raise damaged_checkpoint(directory, f"it has no {ADAPTER_WEIGHTS}", REEXPORT)
    tensors = read_weights(directory, ADAPTER_WEIGHTS, REEXPORT)
    heads = {k: v for k, v in tensors.items() if k.startswith("base_model.")}
    missing = [k for k in (MPT_TENSORS.values() if kind == MPT else ["prompt_embeddings"]) if k not in tensors]
    if task_type == "SEQ_CLS" and not any(k.endswith(".weight") and v.dim() == 2 for k, v in heads.items()):
        missing.append("a classifier/score head")
    if missing:
        raise damaged_checkpoint(directory, f"{ADAPTER_WEIGHTS} lacks {' and '.join(missing)}", REEXPORT)
    if task_type == "CAUSAL_LM" and heads:
        raise UserError(f"PEFT adapter {str(directory)!r} also trained modules of the base model "
                        f"({', '.join(sorted(heads)[:3])}); softprompt's causal_lm keeps the whole model frozen, so it "
                        "cannot apply them. Use an adapter saved without modules_to_save.")
    return config, kind, tensors, heads


def _check_task_type(directory: Path, task_type: str, data_recipe: Recipe | None) -> None:
    """A CAUSAL_LM adapter is read with a causal_lm recipe (its template and label words), a SEQ_CLS one with a
    classification recipe or none."""
    causal_lm = task_type == "CAUSAL_LM"
    if data_recipe is None:
        if causal_lm:
            raise UserError(f"{str(directory)!r} is a PEFT CAUSAL_LM adapter, which says nothing of the template and "
                            "label words it was trained with, so softprompt reads it only with a recipe that has "
                            f"them: softprompt eval {str(directory)} --recipe RECIPE (task.type: causal_lm).")
        return
    theirs = data_recipe.model_task.type
    if (theirs == "causal_lm") != causal_lm:
        raise UserError(f"{str(directory)!r} is a PEFT {task_type} adapter, but the recipe's task.type is {theirs}. "
                        "Give a recipe with task.type: "
                        f"{'causal_lm' if causal_lm else 'sequence_classification'}.")


def _task_count(directory: Path, config: dict[str, Any], kind: str, saved: dict[str, list[str]] | None) -> int:
    """How many tasks the adapter has: multitask prompt tuning's num_tasks, else those exported with it, else 1."""
    count = config.get("num_tasks") if kind == MPT else len(saved or [None])
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise damaged_checkpoint(directory, f"{ADAPTER_CONFIG} has no num_tasks (a positive integer; got {count!r})",
                                 REEXPORT)
    if saved is not None and len(saved) != count:
        raise damaged_checkpoint(directory, f"{TASKS_FILE} names {len(saved)} tasks, {ADAPTER_CONFIG} has "
                                 f"num_tasks {count}", REEXPORT)
    return count


def _recipe_tasks(directory: Path, count: int, saved: dict[str, list[str]] | None, data_recipe: Recipe | None
                  ) -> list[tuple[str, Recipe | None]]:
    """(name, that task's part of the recipe) of each of the adapter's tasks, in the adapter's task order (one
    task: named as a single-task checkpoint's)."""
    names = list(saved or [])
    if data_recipe is None:
        if count > 1:
            raise UserError(f"PEFT adapter {str(directory)!r} has {count} tasks, which it knows by number only: "
                            f"give a recipe whose tasks: are its {count} tasks in its order (eval --recipe).")
        return [(SINGLE_TASK, None)]
    own = data_recipe.task_recipes()
    if len(own) != count:
        theirs = f" ({', '.join(names)})" if names else ""
        raise UserError(f"PEFT adapter {str(directory)!r} has {count} task(s){theirs}, but the recipe has {len(own)} "
                        f"({', '.join(name for name, _ in own)}). Give a recipe with "
                        + ("one task (data and task)." if count == 1 else
                           f"its {count} tasks (tasks:), in the adapter's task order."))
    if count == 1:
        return [(SINGLE_TASK, own[0][1])]
    by_name = dict(own)
    if names and set(names) != set(by_name):
        raise UserError(f"PEFT adapter {str(directory)!r} was exported with the tasks {', '.join(names)} "
                        f"({TASKS_FILE}), but the recipe's tasks are {', '.join(by_name)}. Name the recipe's tasks "
                        "as the adapter's.")
    return [(name, by_name[name]) for name in names] if names else own


def _adapter_method(directory: Path, config: dict[str, Any], kind: str) -> dict[str, Any]:
    n = config["num_virtual_tokens"]
    if kind == "prefix_tuning":
        return {"name": "prefix_tuning", "num_virtual_tokens": n}
    if kind != MPT:  # P-tuning adapters carry the encoder's output only: they are prompt tuning here
        return {"name": "prompt_tuning", "num_virtual_tokens": n}
    rank = config.get("num_ranks")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise damaged_checkpoint(directory, f"{ADAPTER_CONFIG} has no num_ranks (a positive integer; got {rank!r})",
                                 REEXPORT)
    if rank > n:
        raise UserError(f"PEFT adapter {str(directory)!r} has num_ranks {rank}, above its num_virtual_tokens {n}; "
                        "softprompt's multitask prompt tuning keeps the rank at most the number of virtual tokens "
                        "(a higher rank adds nothing). Use an adapter trained with num_ranks <= num_virtual_tokens.")
    return {"name": MPT, "num_virtual_tokens": n, "rank": rank, "init": "random"}


def _task_sections(tasks: list[tuple[str, Recipe | None]], causal_lm: bool) -> dict[str, Any]:
    """The recipe's data and task (one task) or tasks: the recipe's, with PEFT's layout for SEQ_CLS."""
    def task_of(recipe: Recipe | None) -> dict[str, Any]:
        if causal_lm:
            return recipe.task.model_dump(mode="json")
        return {"pooling": "model", "prompt_position": "start"}

    if len(tasks) > 1:
        return {"tasks": [{"name": name, "data": recipe.data.model_dump(mode="json"), "task": task_of(recipe)}
                          for name, recipe in tasks]}
    recipe = tasks[0][1]
    data = recipe.data.model_dump(mode="json") if recipe else {
        "files": {"train": "", "validation": ""}, "text_fields": ["text"]}
    return {"data": data, "task": task_of(recipe)}


def _adapter_tensors(kind: str, tensors: dict[str, torch.Tensor], heads: dict[str, torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
    if kind == MPT:
        prompt = {f"{PROMPT_PREFIX}{ours}": tensors[theirs] for ours, theirs in MPT_TENSORS.items()}
    else:
        key = PREFIX_KEY if kind == "prefix_tuning" else f"{PROMPT_PREFIX}embedding"
        prompt = {key: tensors["prompt_embeddings"]}
    return {**prompt, **{"base." + k.removeprefix("base_model."): v for k, v in heads.items()}}


def _adapter_as_checkpoint(directory: Path, data_recipe: Recipe | None, model_path: str | None = None
                           ) -> tuple[dict, str, dict]:
    config, kind, tensors, heads = _read_adapter(directory)
    causal_lm = config["task_type"] == "CAUSAL_LM"
    _check_task_type(directory, config["task_type"], data_recipe)
    model_name = (config.get("base_model_name_or_path") or model_path
                  or (data_recipe.model.name_or_path if data_recipe else None))
    if not model_name:
        raise UserError(f"PEFT adapter {str(directory)!r} does not name its base model; give --model.")
    saved_tasks, saved_labels = _saved_tasks(directory), _saved_labels(directory)
    count = _task_count(directory, config, kind, saved_tasks)
    if count > 1 and not causal_lm:
        raise UserError(f"PEFT adapter {str(directory)!r} has {count} tasks that share one classifier; softprompt "
                        "gives every task a classification head of its own, so it reads SEQ_CLS adapters of one "
                        "task (num_tasks: 1) only. Use a target adapter of one task, or CAUSAL_LM adapters.")
    tasks = _recipe_tasks(directory, count, saved_tasks, data_recipe)
    if causal_lm:
        task_labels = {name: _lm_label_names(recipe, (saved_tasks or {}).get(name, saved_labels))
                       for name, recipe in tasks}
    else:
        num_labels = next(v for k, v in heads.items() if k.endswith(".weight") and v.dim() == 2).shape[0]
        task_labels = {SINGLE_TASK: _adapter_label_names(directory, num_labels, tasks[0][1], saved_labels)}
    recipe = {"model": {"name_or_path": model_name, "revision": config.get("revision")},
              **_task_sections(tasks, causal_lm), "method": _adapter_method(directory, config, kind)}
    info = {"source": "peft", "label_names": [] if len(tasks) > 1 else task_labels[SINGLE_TASK],
            "tasks": task_labels, "base_model": {
                "name_or_path": model_name,
                "fingerprint": config_fingerprint(load_config(model_name, config.get("revision")))}}
    return info, yaml.safe_dump(recipe), _adapter_tensors(kind, tensors, heads)


def read_adapter_prompt(directory: Path) -> tuple[SourcePrompt, dict[str, Any]]:
    """The prompt of a PEFT adapter that starts another run, and its base model (name_or_path, fingerprint). Only
    the prompt is read, so no recipe is needed, whatever the task type; tasks an adapter does not name (PEFT's
    own) are named by their index, as PEFT's prompt_tuning_init_task counts them."""
    config, kind, tensors, _ = _read_adapter(directory)
    saved = _saved_tasks(directory)
    count = _task_count(directory, config, kind, saved)
    names = list(saved) if saved else [SINGLE_TASK] if count == 1 else [str(i) for i in range(count)]
    model_name = config.get("base_model_name_or_path")
    if not model_name:
        raise UserError(f"PEFT adapter {str(directory)!r} does not name its base model, so it cannot be checked to "
                        "be made for this run's model. Set base_model_name_or_path in its adapter_config.json.")
    prompt, _ = split_trained(_adapter_tensors(kind, tensors, {}))
    base_model = {"name_or_path": model_name,
                  "fingerprint": config_fingerprint(load_config(model_name, config.get("revision")))}
    return SourcePrompt(_adapter_method(directory, config, kind)["name"], prompt, names), base_model


def read_any_checkpoint(directory: Path, data_recipe: Recipe | None = None, model_path: str | None = None
                        ) -> tuple[dict, str, dict]:
    """(info, recipe YAML, tensors) of a softprompt checkpoint or of a PEFT prompt-learning adapter (`model_path`:
    the base model of an adapter that does not name it). A damaged one raises `damaged_checkpoint`'s error;
    whether the tensors fit the model its recipe builds is checked where the model is built (assemble)."""
    if directory.is_dir() and is_peft_adapter(directory):
        return _adapter_as_checkpoint(directory, data_recipe, model_path)
    return read_checkpoint(directory)
