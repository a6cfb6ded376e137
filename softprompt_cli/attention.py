"""Prefix tuning through transformers' attention interface.

A dict passed as `softprompt_capture` receives every layer's (keys, values) instead: the keys and
values that a text leaves in the model, to start a prefix from.

The prefix keys/values reach each attention layer as the keyword argument `softprompt_prefix`
([layers, 2, batch or 1, kv_heads, n, head_dim]), which transformers 5 forwards from the model's
`forward` down to the attention function. Nothing is cached, so it works with gradient
checkpointing, and the result equals passing the same prefix as a `DynamicCache`.

The mask function must be registered under the same name too: transformers builds no attention
mask at all for attention implementations it does not know (padding would be silently ignored).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

ATTENTION_NAME = "softprompt_prefix"


def prefix_attention(module, query, key, value, attention_mask, softprompt_prefix=None, softprompt_capture=None,
                     **kwargs):
    if softprompt_capture is not None:  # init-prefix-from-text: keep every layer's keys and values
        softprompt_capture[module.layer_idx] = (key, value)
    if softprompt_prefix is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    prefix_key, prefix_value = softprompt_prefix[module.layer_idx]
    batch, _, query_length, _ = query.shape
    key_length = key.shape[2]
    num_prefix = prefix_key.shape[-2]
    key = torch.cat([prefix_key.to(key.dtype).expand(batch, -1, -1, -1), key], dim=2)
    value = torch.cat([prefix_value.to(value.dtype).expand(batch, -1, -1, -1), value], dim=2)

    if attention_mask is None and getattr(module, "is_causal", False) and query_length > 1:
        # The mask was skipped because SDPA's is_causal would do; with the prefix in front of the
        # keys is_causal would be misaligned, so spell the causal pattern out.
        attention_mask = torch.ones(query_length, key_length, dtype=torch.bool, device=query.device).tril(
            key_length - query_length
        )[None, None]
    if attention_mask is not None:
        # Every query may attend to every prefix position: True in a boolean mask, 0 in an additive one.
        shape = (*attention_mask.shape[:3], num_prefix)
        fill = (
            torch.ones(shape, dtype=torch.bool, device=attention_mask.device)
            if attention_mask.dtype == torch.bool
            else torch.zeros(shape, dtype=attention_mask.dtype, device=attention_mask.device)
        )
        attention_mask = torch.cat([fill, attention_mask], dim=-1)
    kwargs["is_causal"] = False
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTENTION_NAME, prefix_attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
