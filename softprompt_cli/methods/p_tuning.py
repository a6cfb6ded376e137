"""P-tuning (Liu et al., 2021): virtual token embeddings produced by a trainable prompt encoder."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from softprompt_cli.methods.base import MethodOptions, ModelSpec, register

if TYPE_CHECKING:
    from torch import nn


@register
class PTuning(MethodOptions):
    """Virtual token embeddings reparameterized by an MLP or LSTM prompt encoder."""

    kind: ClassVar = "input"
    name: Literal["p_tuning"] = "p_tuning"
    encoder: Literal["mlp", "lstm"] = Field("mlp", description="the prompt encoder")
    encoder_hidden_size: int = Field(128, ge=1)
    encoder_num_layers: int = Field(2, ge=1, description="hidden layers of the MLP, or LSTM layers")
    encoder_dropout: float = Field(0.0, ge=0, lt=1)

    def build(self, spec: ModelSpec) -> nn.Module:
        from torch import nn

        from softprompt_cli.methods._layers import LstmMlp, VirtualTokens, mlp

        width = spec.vocabulary.width  # the input embeddings' width: below hidden_size in ELECTRA, ALBERT
        if self.encoder == "mlp":
            encoder = mlp(width, self.encoder_hidden_size, width, self.encoder_num_layers, nn.ReLU,
                          self.encoder_dropout)
        else:
            encoder = LstmMlp(width, self.encoder_hidden_size, self.encoder_num_layers, self.encoder_dropout)
        return VirtualTokens(spec.vocabulary.sample(self.num_virtual_tokens), encoder)
