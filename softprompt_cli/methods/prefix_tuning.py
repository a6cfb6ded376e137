"""Prefix tuning (Li & Liang, 2021): trainable keys and values prepended in every attention layer."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from softprompt_cli.methods import MethodOptions, register

if TYPE_CHECKING:
    from torch import nn

    from softprompt_cli.modeling import ModelSpec


@register
class PrefixTuning(MethodOptions):
    """Per-layer key/value prefixes, optionally produced by an MLP (reparameterization)."""

    kind: ClassVar = "prefix"
    name: Literal["prefix_tuning"] = "prefix_tuning"
    projection: bool = Field(False, description="produce the prefixes with an MLP (trained, then dropped)")
    encoder_hidden_size: int = Field(512, ge=1, description="hidden width of the projection MLP")
    init: Literal["random", "zero"] = Field("random", description="start of the prefix (or of the MLP's input)")

    def build(self, spec: ModelSpec) -> nn.Module:
        import torch
        from torch import nn

        from softprompt_cli.methods._layers import PrefixLayout, VirtualTokens, mlp

        n = self.num_virtual_tokens
        width = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim
        input_width = spec.hidden_size if self.projection else width
        start = torch.zeros(n, input_width) if self.init == "zero" else torch.randn(n, input_width)
        encoder = mlp(spec.hidden_size, self.encoder_hidden_size, width, 1, nn.Tanh) if self.projection else None
        return PrefixLayout(VirtualTokens(start, encoder), spec.num_layers, spec.num_kv_heads, spec.head_dim)

