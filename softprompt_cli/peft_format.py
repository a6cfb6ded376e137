"""Interop with Hugging Face PEFT's prompt-learning adapters (SEQ_CLS), both ways, without PEFT.

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
from safetensors.torch import load_file, save_file

from softprompt_cli.checkpoint import atomic_folder, read_checkpoint
from softprompt_cli.errors import UserError
from softprompt_cli.peft_compat import peft_refusal_note
from softprompt_cli.recipe import Recipe

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_TYPES = {"prompt_tuning": "PROMPT_TUNING", "p_tuning": "P_TUNING", "prefix_tuning": "PREFIX_TUNING"}


def is_peft_adapter(directory: Path) -> bool:
    return (directory / ADAPTER_CONFIG).is_file()


def export_peft(checkpoint: Path, out: Path, model_path: str | None = None) -> tuple[Path, str | None]:
    """Write the adapter folder; return it and, where PEFT will refuse the adapter on this base model, what
    to do about it."""
    from softprompt_cli.evaluation import load_trained

    recipe, model, _, label_names = load_trained(checkpoint, model_path)
    method = recipe.method
    causal_lm = recipe.task.type == "causal_lm"
    if recipe.model.gguf_file is not None:
        raise UserError(f"checkpoint {str(checkpoint)!r} was trained on a GGUF file, which PEFT cannot load as a base "
                        "model. Export checkpoints of models stored as safetensors.")
    if recipe.task.pooling != "model":
        raise UserError(f"checkpoint {str(checkpoint)!r} uses task.pooling: {recipe.task.pooling}, a head PEFT does "
                        "not have. Only task.pooling: model checkpoints can be exported to PEFT.")
    if method.kind == "input" and model.insert_at != 0:
        raise UserError(f"checkpoint {str(checkpoint)!r} puts its virtual tokens after [CLS]; PEFT puts them at the "
                        "start, so the exported adapter would compute something else. Train with "
                        "task.prompt_position: start to export to PEFT.")
    spec = model.base.config.get_text_config()
    num_kv_heads = getattr(spec, "num_key_value_heads", None) or spec.num_attention_heads
    head_dim = getattr(spec, "head_dim", None) or spec.hidden_size // spec.num_attention_heads
    with torch.no_grad():
        prompt = model.prompt.tokens() if method.kind == "prefix" else model.prompt()
    tensors = {"prompt_embeddings": prompt}
    tensors |= {f"base_model.{name.removeprefix('base.')}": t for name, t in model.trainable_state().items()
                if not name.startswith("prompt.")}
    config: dict[str, Any] = {
        "peft_type": PEFT_TYPES[method.name], "task_type": "CAUSAL_LM" if causal_lm else "SEQ_CLS", "inference_mode": True, "auto_mapping": None,
        "base_model_name_or_path": recipe.model.name_or_path, "revision": recipe.model.revision,
        "num_virtual_tokens": method.num_virtual_tokens, "num_transformer_submodules": 1,
        "num_layers": spec.num_hidden_layers, "modules_to_save": None if causal_lm else ["classifier", "score"],
        "num_attention_heads": num_kv_heads if method.kind == "prefix" else spec.num_attention_heads,
        "token_dim": num_kv_heads * head_dim if method.kind == "prefix" else spec.hidden_size,
    }
    if method.name == "prompt_tuning":
        config |= {"prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None,
                   "tokenizer_kwargs": None}
    elif method.name == "p_tuning":
        config |= {"encoder_reparameterization_type": method.encoder.upper(),
                   "encoder_hidden_size": method.encoder_hidden_size, "encoder_num_layers": method.encoder_num_layers,
                   "encoder_dropout": method.encoder_dropout}
    else:  # the projection MLP's output is exported: PEFT sees a prefix without projection
        config |= {"encoder_hidden_size": spec.hidden_size, "prefix_projection": False, "init_weights": None}
    with atomic_folder(out) as staging:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, staging / ADAPTER_WEIGHTS,
                  metadata={"format": "pt"})
        (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (staging / "label_names.json").write_text(json.dumps(label_names) + "\n")
    return out, peft_refusal_note(model.base, config["peft_type"], config["task_type"])


def _adapter_as_checkpoint(directory: Path, data_recipe: Recipe | None) -> tuple[dict, str, dict]:
    from softprompt_cli.modeling import config_fingerprint, load_config

    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    kind = {v: k for k, v in PEFT_TYPES.items()}.get(config.get("peft_type"))
    if kind is None or config.get("task_type") != "SEQ_CLS" or config.get("num_transformer_submodules", 1) != 1:
        raise UserError(f"{str(directory)!r} is a PEFT {config.get('peft_type')} {config.get('task_type')} adapter; "
                        "softprompt reads prompt tuning, P-tuning and prefix tuning adapters for SEQ_CLS (a "
                        "CAUSAL_LM adapter says nothing of the template and label words it was trained with).")
    if not (directory / ADAPTER_WEIGHTS).is_file():
        raise UserError(f"PEFT adapter {str(directory)!r} has no {ADAPTER_WEIGHTS}.")
    tensors = load_file(directory / ADAPTER_WEIGHTS)
    heads = {k: v for k, v in tensors.items() if k.startswith("base_model.")}
    if "prompt_embeddings" not in tensors or not heads:
        raise UserError(f"PEFT adapter {str(directory)!r} lacks prompt_embeddings or a classifier/score head.")
    model_name = config.get("base_model_name_or_path") or (data_recipe.model.name_or_path if data_recipe else None)
    if not model_name:
        raise UserError(f"PEFT adapter {str(directory)!r} does not name its base model; give --model.")
    num_labels = next(v for k, v in heads.items() if k.endswith(".weight")).shape[0]
    names_file = directory / "label_names.json"
    label_names = json.loads(names_file.read_text()) if names_file.is_file() else [f"LABEL_{i}" for i in
                                                                                    range(num_labels)]
    if data_recipe is not None and data_recipe.data.label_names:
        label_names = list(data_recipe.data.label_names)
    elif data_recipe is not None and data_recipe.data.glue_task:
        from softprompt_cli.tasks import GLUE_TASKS

        label_names = list(GLUE_TASKS[data_recipe.data.glue_task].label_names)
    if len(label_names) != num_labels:
        raise UserError(f"PEFT adapter {str(directory)!r} has {num_labels} classes, the recipe {len(label_names)}.")
    n = config["num_virtual_tokens"]
    method = {"name": "prefix_tuning", "num_virtual_tokens": n} if kind == "prefix_tuning" else {
        "name": "prompt_tuning", "num_virtual_tokens": n}  # P-tuning adapters carry the encoder's output only
    prompt_key = "prompt.tokens.embedding" if kind == "prefix_tuning" else "prompt.embedding"
    data = data_recipe.model_dump(mode="json")["data"] if data_recipe else {
        "files": {"train": "", "validation": ""}, "text_fields": ["text"]}
    recipe = {"model": {"name_or_path": model_name, "revision": config.get("revision")}, "data": data,
              "task": {"pooling": "model", "prompt_position": "start"}, "method": method}
    info = {"source": "peft", "label_names": label_names, "base_model": {
        "name_or_path": model_name, "fingerprint": config_fingerprint(load_config(model_name, config.get("revision")))}}
    ours = {prompt_key: tensors["prompt_embeddings"],
            **{"base." + k.removeprefix("base_model."): v for k, v in heads.items()}}
    return info, yaml.safe_dump(recipe), ours


def read_any_checkpoint(directory: Path, data_recipe: Recipe | None = None) -> tuple[dict, str, dict]:
    """(info, recipe YAML, tensors) of a softprompt checkpoint or of a PEFT prompt-learning adapter."""
    if directory.is_dir() and is_peft_adapter(directory):
        return _adapter_as_checkpoint(directory, data_recipe)
    return read_checkpoint(directory)
