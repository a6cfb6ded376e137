"""Prefix tuning (Li & Liang, 2021): trainable keys and values prepended in every attention layer."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, model_validator

from softprompt_cli.methods.base import MethodOptions, ModelSpec, register

if TYPE_CHECKING:
    from torch import nn


@register
class PrefixTuning(MethodOptions):
    """Per-layer key/value prefixes, optionally produced by an MLP (reparameterization)."""

    kind: ClassVar = "prefix"
    name: Literal["prefix_tuning"] = "prefix_tuning"
    projection: bool = Field(False, description="produce the prefixes with an MLP (trained, then dropped)")
    encoder_hidden_size: int = Field(512, ge=1, description="hidden width of the projection MLP")
    init: Literal["random", "zero", "text", "from_checkpoint"] = Field(
        "random",
        description="random/zero: start of the prefix (or of the MLP's input); text: the keys and values init_text "
        "leaves in the frozen model; from_checkpoint: a prefix from init_checkpoint (softprompt "
        "init-prefix-from-text, or a trained prefix-tuning checkpoint)",
    )
    init_text: str | None = Field(None, description="text for init: text")
    init_checkpoint: str | None = Field(None, description="checkpoint folder for init: from_checkpoint")

    @model_validator(mode="after")
    def _init_source(self) -> PrefixTuning:
        if self.init == "text" and not (self.init_text and self.init_text.strip()):
            raise ValueError("init: text needs a non-empty init_text")
        if self.init == "from_checkpoint" and not self.init_checkpoint:
            raise ValueError("init: from_checkpoint needs init_checkpoint (a folder)")
        if self.init == "from_checkpoint" and not (Path(self.init_checkpoint) / "softprompt.safetensors").is_file():
            raise ValueError(f"init_checkpoint {self.init_checkpoint!r} is not a checkpoint folder; make one with "
                             "softprompt init-prefix-from-text")
        if self.init in ("text", "from_checkpoint") and self.projection:
            raise ValueError(f"init: {self.init} sets the prefix itself; it needs projection: false")
        return self

    def for_trained(self) -> PrefixTuning:
        if self.init in ("text", "from_checkpoint"):
            return self.model_copy(update={"init": "zero", "init_checkpoint": None, "init_text": None})
        return self

    def build(self, spec: ModelSpec) -> nn.Module:
        import torch
        from torch import nn

        from softprompt_cli.methods._layers import PrefixLayout, VirtualTokens, mlp

        n = self.num_virtual_tokens
        width = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim
        input_width = spec.hidden_size if self.projection else width
        if self.init == "text":
            start = spec.prefix_from_text(self.init_text, n)
        elif self.init == "from_checkpoint":
            start = spec.prefix_from_checkpoint(Path(self.init_checkpoint), n, width)
        else:
            start = torch.zeros(n, input_width) if self.init == "zero" else torch.randn(n, input_width)
        encoder = mlp(spec.hidden_size, self.encoder_hidden_size, width, 1, nn.Tanh) if self.projection else None
        return PrefixLayout(VirtualTokens(start, encoder), spec.num_layers, spec.num_kv_heads, spec.head_dim)

