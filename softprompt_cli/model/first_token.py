"""The last encoder layer computed for the first token alone, when the classification head reads only it.

An encoder's own sequence-classification head reads the final state of the first token ([CLS]): BERT's
pooler, the RoBERTa and ELECTRA heads. In the last layer the other tokens still matter through their keys
and values, which the first token attends to, but their queries, attention outputs and feed-forward pass
feed nothing that is read. Computing that layer for the first token alone gives the same logits and the
same gradients, and saves about five sixths of the layer (most of a 1/num_layers share of each training
step and of each evaluation batch).

Only the BERT family takes the shortcut (architectures whose layers are BERT's and whose head reads the
first token, checked again on the layer's parts); any other model runs unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from softprompt_cli.model.layer_patch import forward_is, patch_forward

# transformers' copies of BertLayer whose sequence-classification heads read the first token alone
BERT_FAMILY = {"bert", "roberta", "xlm-roberta", "camembert", "electra", "data2vec-text", "ernie"}


def last_bert_layer(base: nn.Module) -> nn.Module | None:
    """The last layer of a BERT-family encoder, or None."""
    if base.config.model_type not in BERT_FAMILY:
        return None
    layers = getattr(getattr(base.base_model, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return None
    layer = layers[-1]
    attention = getattr(getattr(layer, "attention", None), "self", None)
    built_like_bert = (
        all(isinstance(getattr(attention, name, None), nn.Linear) for name in ("query", "key", "value"))
        and hasattr(attention, "attention_head_size") and hasattr(layer.attention, "output")
        and hasattr(layer, "feed_forward_chunk") and not getattr(layer, "is_decoder", True)
        and getattr(attention, "position_embedding_type", "absolute") == "absolute"
    )
    return layer if built_like_bert else None


def first_token_forward(layer: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                        *args, softprompt_first_token: bool = False, **kwargs):
    """With `softprompt_first_token=True` (a model forward argument, which transformers passes down to every
    layer, and which gradient checkpointing replays), BertLayer.forward for the first token alone:
    [batch, 1, hidden], attending to the keys and values of every token. Otherwise the layer's own forward."""
    if not softprompt_first_token:
        return type(layer).forward(layer, hidden_states, attention_mask, *args, **kwargs)
    # an encoder's classification pass has no cache and no cross-attention to pass on
    kwargs = {key: value for key, value in kwargs.items() if key not in ("encoder_attention_mask", "past_key_values")}
    attention = layer.attention.self
    first = hidden_states[:, :1]

    def heads(states: torch.Tensor) -> torch.Tensor:
        return states.view(*states.shape[:2], -1, attention.attention_head_size).transpose(1, 2)

    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :1]  # the first query's row ([B, 1, L, L] or [B, 1, 1, L])
    attend = ALL_ATTENTION_FUNCTIONS[attention.config._attn_implementation]
    attended, _ = attend(attention, heads(attention.query(first)), heads(attention.key(hidden_states)),
                         heads(attention.value(hidden_states)), attention_mask,
                         dropout=attention.dropout.p if attention.training else 0.0, scaling=attention.scaling,
                         **kwargs)
    return layer.feed_forward_chunk(layer.attention.output(attended.reshape(*first.shape[:2], -1), first))


def enable_first_token_only(base: nn.Module) -> bool:
    """Let the base model's last layer compute the first token alone when a forward call asks for it
    (`softprompt_first_token=True`); False for models outside the BERT family, which cannot."""
    layer = last_bert_layer(base)
    if layer is None:
        return False
    patch_forward(layer, first_token_forward)
    return True


def first_token_enabled(base: nn.Module) -> bool:
    """Whether `enable_first_token_only` patched this model's last layer."""
    return forward_is(last_bert_layer(base), first_token_forward)
