"""Prompt tuning (Lester et al., 2021): N trainable virtual token embeddings in the input."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, model_validator

from softprompt_cli.methods.base import MethodOptions, ModelSpec, register

if TYPE_CHECKING:
    from torch import nn


@register
class PromptTuning(MethodOptions):
    """Trainable virtual token embeddings inserted into the input embeddings."""

    kind: ClassVar = "input"
    name: Literal["prompt_tuning"] = "prompt_tuning"
    init: Literal["random", "text", "sample_vocab"] = Field(
        "sample_vocab",
        description="random: Gaussian at the vocabulary's scale; text: embeddings of init_text "
        "(repeated or truncated to num_virtual_tokens); sample_vocab: random vocabulary rows",
    )
    init_text: str | None = Field(None, description="text whose token embeddings start the prompt (init: text)")

    @model_validator(mode="after")
    def _text_given(self) -> PromptTuning:
        if self.init == "text" and not (self.init_text and self.init_text.strip()):
            raise ValueError("init: text needs a non-empty init_text")
        return self

    def for_trained(self) -> PromptTuning:
        # the cheapest start to throw away: random measures the whole vocabulary's spread (2 s on Gemma 3's)
        return self.model_copy(update={"init": "sample_vocab"}) if self.init == "random" else self

    def build(self, spec: ModelSpec) -> nn.Module:
        from softprompt_cli.methods._layers import VirtualTokens

        vocabulary, n = spec.vocabulary, self.num_virtual_tokens
        if self.init == "text":
            return VirtualTokens(vocabulary.text(spec.tokenizer, self.init_text, n))
        if self.init == "sample_vocab":
            return VirtualTokens(vocabulary.sample(n))
        return VirtualTokens(vocabulary.random(n))
