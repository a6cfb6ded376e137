"""Prefixes computed from real text: the keys and values a text leaves in every attention layer.

For a decoder, a prefix made from text T makes the model see T: its logits for X equal its logits
for T+X at the positions of X. Encoders attend both ways, so there the prefix only approximates T
(T's tokens saw the whole text, not X).
"""

from __future__ import annotations

import torch

from softprompt_cli.errors import UserError


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
    base.base_model(input_ids=torch.tensor([ids], device=base.device), softprompt_capture=captured)
    base.train(was_training)
    layers = [torch.stack(captured[i]) for i in range(len(captured))]  # each [2, 1, kv_heads, T, head_dim]
    per_token = torch.stack(layers)[:, :, 0, :, :num_virtual_tokens]  # [layers, 2, kv_heads, n, head_dim]
    return per_token.permute(3, 0, 1, 2, 4).reshape(num_virtual_tokens, -1).float().clone()
