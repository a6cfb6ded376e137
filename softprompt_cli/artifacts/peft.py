"""Interop with Hugging Face PEFT's prompt-learning adapters (SEQ_CLS, CAUSAL_LM), both ways, without PEFT.

Export writes `adapter_config.json` + `adapter_model.safetensors` (the prompt's inference form as
`prompt_embeddings`, the head under `base_model.<classifier|score>.*`) for
`PeftModel.from_pretrained`. Import reads such a folder as a checkpoint (`eval`, `predict`).
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
from softprompt_cli.config.schema import Recipe
from softprompt_cli.data.glue import GLUE_TASKS
from softprompt_cli.errors import UserError
from softprompt_cli.model.loading import Geometry, config_fingerprint, load_config
from softprompt_cli.model.soft_prompt import PROMPT_PREFIX, SoftPromptModel, split_trained
from softprompt_cli.peft_compat import peft_refusal_note

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_TYPES = {"prompt_tuning": "PROMPT_TUNING", "p_tuning": "P_TUNING", "prefix_tuning": "PREFIX_TUNING"}


def is_peft_adapter(directory: Path) -> bool:
    return (directory / ADAPTER_CONFIG).is_file()


def _refuse_inexpressible(name: str, recipe: Recipe, model: SoftPromptModel) -> None:
    if recipe.model.gguf_file is not None:
        raise UserError(f"checkpoint {name!r} was trained on a GGUF file, which PEFT cannot load as a base "
                        "model. Export checkpoints of models stored as safetensors.")
    if recipe.task.pooling != "model":
        raise UserError(f"checkpoint {name!r} uses task.pooling: {recipe.task.pooling}, a head PEFT does "
                        "not have. Only task.pooling: model checkpoints can be exported to PEFT.")
    if recipe.method.kind == "input" and model.insert_at != 0:
        raise UserError(f"checkpoint {name!r} puts its virtual tokens after [CLS]; PEFT puts them at the "
                        "start, so the exported adapter would compute something else. Train with "
                        "task.prompt_position: start to export to PEFT.")


def _adapter_config(recipe: Recipe, geometry: Geometry) -> dict[str, Any]:
    method = recipe.method
    causal_lm = recipe.task.type == "causal_lm"
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
    if method.name == "prompt_tuning":
        config |= {"prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None,
                   "tokenizer_kwargs": None}
    elif method.name == "p_tuning":
        config |= {"encoder_reparameterization_type": method.encoder.upper(),
                   "encoder_hidden_size": method.encoder_hidden_size, "encoder_num_layers": method.encoder_num_layers,
                   "encoder_dropout": method.encoder_dropout}
    else:  # the projection MLP's output is exported: PEFT sees a prefix without projection
        config |= {"encoder_hidden_size": geometry.hidden_size, "prefix_projection": False, "init_weights": None}
    return config


def write_peft_adapter(out: Path, name: str, recipe: Recipe, model: SoftPromptModel,
                       label_names: list[str]) -> str | None:
    """Write a trained model as a PEFT adapter folder; return what to tell the user where PEFT will refuse to
    apply it to this base model (else None)."""
    _refuse_inexpressible(name, recipe, model)
    with torch.no_grad():
        prompt = model.prompt.tokens() if recipe.method.kind == "prefix" else model.prompt()
    _, head = split_trained(model.trainable_state())
    tensors = {"prompt_embeddings": prompt, **{f"base_model.{k.removeprefix('base.')}": t for k, t in head.items()}}
    config = _adapter_config(recipe, Geometry.of(model.base.config))
    with atomic_folder(out) as staging:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, staging / ADAPTER_WEIGHTS,
                  metadata={"format": "pt"})
        (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (staging / "label_names.json").write_text(json.dumps(label_names) + "\n")
    return peft_refusal_note(model.base, config["peft_type"], config["task_type"])


REEXPORT = ("Export it again (softprompt export CHECKPOINT OUT --format peft) or save it again with PEFT's "
            "save_pretrained, or use another adapter.")


def _adapter_label_names(directory: Path, num_labels: int, data_recipe: Recipe | None) -> list[str]:
    names_file = directory / "label_names.json"
    label_names = [f"LABEL_{i}" for i in range(num_labels)]
    if names_file.is_file():
        try:
            label_names = json.loads(names_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise damaged_checkpoint(directory, f"label_names.json is not valid JSON ({err})", REEXPORT) from None
        if not isinstance(label_names, list) or not all(isinstance(name, str) for name in label_names):
            raise damaged_checkpoint(directory, "label_names.json is not a list of label names", REEXPORT)
    if data_recipe is not None and data_recipe.data.label_names:
        label_names = list(data_recipe.data.label_names)
    elif data_recipe is not None and data_recipe.data.glue_task:
        label_names = list(GLUE_TASKS[data_recipe.data.glue_task].label_names)
    if len(label_names) != num_labels:
        raise UserError(f"PEFT adapter {str(directory)!r} has {num_labels} classes, the recipe {len(label_names)}. "
                        "Give a recipe (--recipe) whose data has the adapter's labels.")
    return label_names


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
    if kind is None or config.get("task_type") != "SEQ_CLS" or config.get("num_transformer_submodules", 1) != 1:
        raise UserError(f"{str(directory)!r} is a PEFT {config.get('peft_type')} {config.get('task_type')} adapter; "
                        "softprompt reads prompt tuning, P-tuning and prefix tuning adapters for SEQ_CLS (a "
                        "CAUSAL_LM adapter says nothing of the template and label words it was trained with).")
    if not (directory / ADAPTER_WEIGHTS).is_file():
        if (directory / "adapter_model.bin").is_file():
            raise UserError(f"PEFT adapter {str(directory)!r} is saved as adapter_model.bin (pickle), which softprompt "
                            "never loads. Save it with PEFT's save_pretrained(..., safe_serialization=True).")
        raise damaged_checkpoint(directory, f"it has no {ADAPTER_WEIGHTS}", REEXPORT)
    tensors = read_weights(directory, ADAPTER_WEIGHTS, REEXPORT)
    heads = {k: v for k, v in tensors.items() if k.startswith("base_model.")}
    if "prompt_embeddings" not in tensors or not any(k.endswith(".weight") and v.dim() == 2 for k, v in heads.items()):
        raise damaged_checkpoint(directory, f"{ADAPTER_WEIGHTS} lacks prompt_embeddings or a classifier/score head",
                                 REEXPORT)
    return config, kind, tensors, heads


def _adapter_as_checkpoint(directory: Path, data_recipe: Recipe | None, model_path: str | None = None
                           ) -> tuple[dict, str, dict]:
    config, kind, tensors, heads = _read_adapter(directory)
    model_name = (config.get("base_model_name_or_path") or model_path
                  or (data_recipe.model.name_or_path if data_recipe else None))
    if not model_name:
        raise UserError(f"PEFT adapter {str(directory)!r} does not name its base model; give --model.")
    num_labels = next(v for k, v in heads.items() if k.endswith(".weight") and v.dim() == 2).shape[0]
    label_names = _adapter_label_names(directory, num_labels, data_recipe)
    n = config["num_virtual_tokens"]
    # P-tuning adapters carry the encoder's output only: they are prompt tuning here
    method = {"name": "prefix_tuning" if kind == "prefix_tuning" else "prompt_tuning", "num_virtual_tokens": n}
    prompt_key = PREFIX_KEY if kind == "prefix_tuning" else f"{PROMPT_PREFIX}embedding"
    data = data_recipe.model_dump(mode="json")["data"] if data_recipe else {
        "files": {"train": "", "validation": ""}, "text_fields": ["text"]}
    recipe = {"model": {"name_or_path": model_name, "revision": config.get("revision")}, "data": data,
              "task": {"pooling": "model", "prompt_position": "start"}, "method": method}
    info = {"source": "peft", "label_names": label_names, "base_model": {
        "name_or_path": model_name, "fingerprint": config_fingerprint(load_config(model_name, config.get("revision")))}}
    ours = {prompt_key: tensors["prompt_embeddings"],
            **{"base." + k.removeprefix("base_model."): v for k, v in heads.items()}}
    return info, yaml.safe_dump(recipe), ours


def read_any_checkpoint(directory: Path, data_recipe: Recipe | None = None, model_path: str | None = None
                        ) -> tuple[dict, str, dict]:
    """(info, recipe YAML, tensors) of a softprompt checkpoint or of a PEFT prompt-learning adapter (`model_path`:
    the base model of an adapter that does not name it). A damaged one raises `damaged_checkpoint`'s error;
    whether the tensors fit the model its recipe builds is checked where the model is built (assemble)."""
    if directory.is_dir() and is_peft_adapter(directory):
        return _adapter_as_checkpoint(directory, data_recipe, model_path)
    return read_checkpoint(directory)
