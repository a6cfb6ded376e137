"""Prefixes computed from real text: the keys and values a text leaves in every attention layer.

For a decoder, a prefix made from text T makes the model see T: its logits for X equal its logits
for T+X at the positions of X. Encoders attend both ways, so there the prefix only approximates T
(T's tokens saw the whole text, not X).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from softprompt_cli.checkpoint import INFO_FILE, WEIGHTS_FILE, atomic_folder
from softprompt_cli.errors import UserError

PREFIX_KEY = "prompt.tokens.embedding"


def text_token_ids(tokenizer, text: str, chat_template: bool = False) -> list[int]:
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("--chat-template: this tokenizer has no chat template. Leave the flag out.")
        return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                                  return_dict=True)["input_ids"])
    return list(tokenizer(text)["input_ids"])


@torch.no_grad()
def prefix_from_ids(base, ids: list[int], num_virtual_tokens: int) -> torch.Tensor:
    """Flat prefix [n, layers * 2 * kv_heads * head_dim] (PEFT's layout) from the first n tokens of `ids`.

    `base` must use the softprompt attention implementation (prefix-tuning models do)."""
    if len(ids) < num_virtual_tokens:
        raise UserError(f"the text has {len(ids)} tokens, fewer than the {num_virtual_tokens} virtual tokens asked "
                        "for. Give a longer text or fewer virtual tokens.")
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    was_training = base.training
    base.eval()
    base.base_model(input_ids=torch.tensor([ids]), softprompt_capture=captured)
    base.train(was_training)
    layers = [torch.stack(captured[i]) for i in range(len(captured))]  # each [2, 1, kv_heads, T, head_dim]
    per_token = torch.stack(layers)[:, :, 0, :, :num_virtual_tokens]  # [layers, 2, kv_heads, n, head_dim]
    return per_token.permute(3, 0, 1, 2, 4).reshape(num_virtual_tokens, -1).float().clone()


def write_prefix_checkpoint(out: Path, prefix: torch.Tensor, model_name: str, revision: str | None,
                            fingerprint: str, text: str) -> None:
    info = {"format_version": 1, "kind": "prefix_init",
            "method": {"name": "prefix_tuning", "num_virtual_tokens": prefix.shape[0], "projection": False},
            "base_model": {"name_or_path": model_name, "revision": revision, "fingerprint": fingerprint},
            "source_text": text}
    with atomic_folder(out) as staging:
        save_file({PREFIX_KEY: prefix.contiguous()}, staging / WEIGHTS_FILE, metadata={"format": "pt"})
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


def read_prefix_checkpoint(directory: Path, num_virtual_tokens: int, width: int, fingerprint: str) -> torch.Tensor:
    """The prefix of a prefix-tuning checkpoint (from init-prefix-from-text or training), checked against
    the model and method it is to start."""
    if not (directory / WEIGHTS_FILE).is_file() or not (directory / INFO_FILE).is_file():
        raise UserError(f"method.init_checkpoint {str(directory)!r} is not a checkpoint folder (it needs "
                        f"{WEIGHTS_FILE} and {INFO_FILE}); make one with softprompt init-prefix-from-text.")
    info = json.loads((directory / INFO_FILE).read_text())
    if info["base_model"]["fingerprint"] != fingerprint:
        raise UserError(f"method.init_checkpoint {str(directory)!r} was made for {info['base_model']['name_or_path']!r}"
                        ", a different model. Make the prefix with the recipe's model.")
    prefix = load_file(directory / WEIGHTS_FILE).get(PREFIX_KEY)
    if prefix is None or tuple(prefix.shape) != (num_virtual_tokens, width):
        shape = None if prefix is None else tuple(prefix.shape)
        raise UserError(f"method.init_checkpoint {str(directory)!r} holds a prefix of shape {shape}, not "
                        f"{(num_virtual_tokens, width)}: set method.num_virtual_tokens to match it (and "
                        "projection: false).")
    return prefix


def init_prefix_from_text(model_name: str, text: str, num_virtual_tokens: int, out: Path, revision: str | None = None,
                          chat_template: bool = False, overwrite: bool = False, gguf_file: str | None = None
                          ) -> tuple[int, int]:
    """Write a prefix-tuning checkpoint from `text`; return (tokens in the text, bytes written)."""
    from softprompt_cli.modeling import config_fingerprint, load_base_model, load_tokenizer

    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output folder {str(out)!r} exists and is not empty. Choose another -o, or pass --overwrite.")
    if not text.strip():
        raise UserError("the text is empty. Give a text of at least --num-virtual-tokens tokens.")
    try:
        tokenizer = load_tokenizer(model_name, revision, gguf_file=gguf_file)
    except UserError as err:
        raise UserError(f"{model_name!r} has no usable tokenizer ({err})") from None
    base = load_base_model(model_name, revision=revision, dtype="float32", trust_remote_code=False, pooling="mean",
                           label_names=[], gguf_file=gguf_file)
    ids = text_token_ids(tokenizer, text, chat_template)
    prefix = prefix_from_ids(base, ids, num_virtual_tokens)
    write_prefix_checkpoint(out, prefix, model_name, revision, config_fingerprint(base.config), text)
    return len(ids), (out / WEIGHTS_FILE).stat().st_size
