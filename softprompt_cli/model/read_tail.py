"""A decoder's last layer finishing only the last columns, when only their states are read.

A causal LM's loss reads the final states of the positions that predict a target (the label word: one position a
row; a generation target: its last few), all of them at the end of left-padded rows; scoring label words and
starting a generation read the last position. In the last layer the other positions still matter through their
keys and values, which the attention computes for every position as before; but their residual, feed-forward
half (three quarters of a Llama layer's weights, and of its matrix products) feeds nothing that is read. Finishing
that half for the last columns alone gives the same states there, the same loss and the same gradients, and saves
most of a 1/num_layers share of each training step and scoring pass. The attention half is left whole: its queries
and output projection for the other positions are a small part of the layer, and skipping them would mean
rewriting each architecture's attention.

Only decoder layers whose forward is one of the `LAYOUTS` (checked again on the layer's parts) take the shortcut;
any other model runs unchanged.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass

import torch
from torch import nn

from softprompt_cli.model.layer_patch import forward_is, patch_forward


@dataclass(frozen=True)
class Layout:
    """A pre-norm decoder layer, `states + post_attention(attention(norm(states)))` then `states +
    post_feed_forward(mlp(pre_feed_forward(states)))`: which of the layer's modules are those norms (None: none)."""

    attention_norm: str
    after_attention: str | None
    feed_forward_norm: str
    after_feed_forward: str | None


LLAMA = Layout("input_layernorm", None, "post_attention_layernorm", None)
GEMMA = Layout("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
LAYOUTS = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": LLAMA, "gemma3_text": GEMMA}
"""transformers' decoder layers whose forward is exactly the layout's, by model type (tested layer by layer
against the layer's own forward)."""


def _layout(base: nn.Module) -> Layout | None:
    config = getattr(base, "config", None)
    return LAYOUTS.get(getattr(config, "model_type", None))


def last_decoder_layer(base: nn.Module) -> nn.Module | None:
    """The last layer of a decoder built as one of the `LAYOUTS`, or None."""
    layout = _layout(base)
    layers = getattr(base.base_model, "layers", None)
    if layout is None or not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return None
    layer = layers[-1]
    parts = ("self_attn", "mlp", *(name for name in astuple(layout) if name))
    return layer if all(isinstance(getattr(layer, name, None), nn.Module) for name in parts) else None


def _apply(layer: nn.Module, name: str | None, states: torch.Tensor) -> torch.Tensor:
    return states if name is None else getattr(layer, name)(states)


def read_columns(states: torch.Tensor, read: int | torch.Tensor) -> torch.Tensor:
    """The columns of `states` ([batch, length, ...]) that are read: the last `read` (an int), or those at the
    indices `read` (a tensor: a sequence of several rows one after another, `model.shared_pass`)."""
    return states[:, -read:] if isinstance(read, int) else states[:, read]


def read_tail_forward(layer: nn.Module, hidden_states: torch.Tensor, *args,
                      softprompt_read_tail: int | torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """With `softprompt_read_tail` (a model forward argument, which transformers passes down to every layer, and
    which gradient checkpointing replays: the columns read, `read_columns`), the layer's forward for those columns
    alone, [batch, columns read, hidden], their attention reading every position's keys and values. Otherwise the
    layer's own forward."""
    full, tail = type(layer).forward, softprompt_read_tail
    if tail is None or args:  # arguments passed by position: only the layer's own forward knows them
        states = full(layer, hidden_states, *args, **kwargs)
        return states if tail is None else read_columns(states, tail)
    layout = layer.softprompt_layout
    attended, _ = layer.self_attn(hidden_states=_apply(layer, layout.attention_norm, hidden_states), **kwargs)
    states = read_columns(hidden_states, tail) + _apply(layer, layout.after_attention, read_columns(attended, tail))
    fed = layer.mlp(_apply(layer, layout.feed_forward_norm, states))
    return states + _apply(layer, layout.after_feed_forward, fed)


def enable_read_tail(base: nn.Module) -> bool:
    """Let the base model's last layer finish only the last columns when a forward call asks for it
    (`softprompt_read_tail=n`); False for decoders outside the `LAYOUTS`, which cannot. Idempotent."""
    layer = last_decoder_layer(base)
    if layer is None:
        return False
    layer.softprompt_layout = _layout(base)
    patch_forward(layer, read_tail_forward)
    return True


def read_tail_enabled(base: nn.Module) -> bool:
    """Whether `enable_read_tail` patched this model's last layer."""
    return forward_is(last_decoder_layer(base), read_tail_forward)
