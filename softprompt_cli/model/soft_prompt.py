"""The frozen base model plus a soft-prompt method plus a classification head (or, for causal_lm, the
model's own LM head): one SoftPromptModel.

The wrapper, not the methods, handles where virtual tokens go, attention masks, position ids,
token type ids and which hidden state the head reads. It reads the base model and tokenizer and
changes neither (`loading.prepare_frozen` prepares them once), so several SoftPromptModels can share them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from softprompt_cli.errors import UserError
from softprompt_cli.methods.base import MethodOptions, ModelSpec
from softprompt_cli.model import heads, lm
from softprompt_cli.model.first_token import first_token_enabled
from softprompt_cli.model.loading import (
    Geometry,
    cache_argument,
    config_fingerprint,
    is_decoder,
    is_prepared,
    model_head,
)
from softprompt_cli.model.prefix_capture import prefix_from_ids, text_token_ids

PROMPT_PREFIX = "prompt."
"""Parameters and checkpoint tensors of the soft prompt start with this; the head's do not."""


def split_trained(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(prompt tensors without `prompt.`, head tensors as named in the model) of a trained state."""
    prompt = {k.removeprefix(PROMPT_PREFIX): v for k, v in tensors.items() if k.startswith(PROMPT_PREFIX)}
    return prompt, {k: v for k, v in tensors.items() if not k.startswith(PROMPT_PREFIX)}


@dataclass
class Encoded:
    """The frozen model's output for a batch of rows, before pooling and head."""

    states: torch.Tensor
    """Last hidden states [rows, length, hidden], or the input of the model's own head."""
    real_tokens: torch.Tensor
    """1 for real (not virtual, not padding) tokens."""
    attention_mask: torch.Tensor
    next_position: torch.Tensor | None = None
    """Decoders: the position id of a token appended to each row."""


def _insert(values: torch.Tensor, middle: torch.Tensor, at: int) -> torch.Tensor:
    """`middle` inserted into every row of `values` at position `at`."""
    return torch.cat([values[:, :at], middle, values[:, at:]], dim=1)


def _no_prefix_source(folder: Path, n: int, width: int) -> torch.Tensor:
    raise UserError("method.init: from_checkpoint needs a prefix reader; build the model through "
                    "softprompt_cli.assemble.")


def model_spec(base: nn.Module, tokenizer, prefix_from_checkpoint: Callable | None = None) -> ModelSpec:
    """What methods may know of the base model; reading it changes nothing."""
    geometry = Geometry.of(base.config)
    fingerprint = config_fingerprint(base.config)
    reader = _no_prefix_source if prefix_from_checkpoint is None else functools.partial(
        prefix_from_checkpoint, fingerprint=fingerprint)
    return ModelSpec(
        hidden_size=geometry.hidden_size, num_layers=geometry.num_layers, num_kv_heads=geometry.num_kv_heads,
        head_dim=geometry.head_dim, input_embeddings=base.get_input_embeddings(), tokenizer=tokenizer,
        fingerprint=fingerprint,
        prefix_from_text=lambda text, n: prefix_from_ids(base, text_token_ids(tokenizer, text), n),
        prefix_from_checkpoint=reader,
    )


class SoftPromptModel(nn.Module):
    """A frozen transformer and a trainable soft prompt, plus a trainable classification head
    (sequence_classification) or the model's own next-token predictions (causal_lm)."""

    def __init__(self, base: nn.Module, method: MethodOptions, tokenizer, pooling: str, num_labels: int,
                 max_length: int, prompt_position: str = "after_special",
                 task_type: str = "sequence_classification", label_word_ids: list[list[int]] | None = None,
                 prefix_from_checkpoint: Callable | None = None):
        super().__init__()
        if not is_prepared(base):
            raise ValueError("the base model is not prepared for soft prompts: call model.loading.prepare_frozen "
                             "on it (and its tokenizer) once, or build through softprompt_cli.assemble.")
        geometry = Geometry.of(base.config)
        if geometry.max_positions and method.num_virtual_tokens + max_length > geometry.max_positions:
            raise UserError(
                f"method.num_virtual_tokens ({method.num_virtual_tokens}) + data.max_length ({max_length}) exceeds "
                f"the model's {geometry.max_positions} positions. Lower one of them."
            )
        self.base = base
        self.pooling = pooling
        self.kind = method.kind
        self.num_virtual_tokens = method.num_virtual_tokens
        self.is_decoder = is_decoder(base)
        self.cache_argument = cache_argument(base)
        self.causal_lm = task_type == "causal_lm"
        self.label_word_ids = label_word_ids
        """causal_lm with label words: each label's tokens, scored for rank classification."""
        self.prompt = method.build(model_spec(base, tokenizer, prefix_from_checkpoint))
        self.insert_at = self._insert_position(tokenizer, prompt_position)
        self.head_reads_model_pooler = pooling == "model" and not self.is_decoder and not self.causal_lm
        self._attach_head(pooling, geometry, num_labels)
        self.first_token_only = self.head_reads_model_pooler and first_token_enabled(base)

    def _insert_position(self, tokenizer, prompt_position: str) -> int:
        """Virtual tokens go after a leading [CLS]/<s> in encoders, so that the model's own head still reads
        [CLS]; decoders read the last token, so the prompt simply goes first."""
        probe = tokenizer("x")["input_ids"]
        leading_special = bool(probe) and probe[0] in tokenizer.all_special_ids
        return 1 if (prompt_position == "after_special" and not self.is_decoder and leading_special) else 0

    def _attach_head(self, pooling: str, geometry: Geometry, num_labels: int) -> None:
        if self.causal_lm:
            self.head = None
            self.head_prefix = None
        elif pooling in ("mean", "pair_mean"):
            dropout = getattr(self.base.config.get_text_config(), "hidden_dropout_prob", 0.1) or 0.0
            self.head_dropout = nn.Dropout(dropout)
            self.head = nn.Linear(heads.mean_feature_size(pooling, geometry.hidden_size), num_labels)
            self.head_prefix = "head."
        else:
            # The model's own head, registered on the base model only: its weights are saved as base.<name>.*
            name, head = model_head(self.base)
            object.__setattr__(self, "head", head)
            self.head_prefix = f"base.{name}."

    def is_trained(self, name: str) -> bool:
        """The one rule for what trains, what is saved and what a checkpoint holds: the prompt and the head."""
        return name.startswith(PROMPT_PREFIX) or (self.head_prefix is not None and name.startswith(self.head_prefix))

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.named_parameters() if self.is_trained(name)}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.trainable_state())
        if set(state) != expected:
            raise UserError(f"checkpoint tensors {sorted(state)} do not match this model's {sorted(expected)}.")
        self.load_state_dict(state, strict=False)

    def head_state(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The head's weights in `tensors` (a trained state), named as in the head module."""
        return {k.removeprefix(self.head_prefix): v for k, v in tensors.items()
                if self.head_prefix is not None and k.startswith(self.head_prefix)}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Classification: logits (and the loss, given label ids). causal_lm: the loss on the target tokens
        (labels: token ids, -100 where nothing is to be predicted)."""
        encoded = self.encode(input_ids, attention_mask, token_type_ids, self.prompt())
        if self.causal_lm:
            # Hidden state t predicts token t + 1; only target positions go through the (large) LM head.
            states = encoded.states[:, -input_ids.shape[1]:-1]  # without leading virtual tokens
            targets = labels[:, 1:]
            keep = targets != -100
            return {"loss": F.cross_entropy(self.lm_head(states[keep]).float(), targets[keep])}
        output = {"logits": self.classify(encoded)}
        if labels is not None:
            output["loss"] = F.cross_entropy(output["logits"].float(), labels)
        return output

    @property
    def lm_head(self) -> nn.Module:
        return self.base.get_output_embeddings()

    @torch.no_grad()
    def scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None,
               with_prompt: bool = True) -> torch.Tensor:
        """One score per label: the head's logits, or (causal_lm) each label word's log-likelihood after the
        input. `with_prompt=False`: the frozen model alone (the zero-shot baseline of a causal_lm template)."""
        prompt = self.prompt() if with_prompt else None
        if not self.causal_lm:
            return self.classify(self.encode(input_ids, attention_mask, token_type_ids, prompt))
        return lm.label_word_scores(self, input_ids, attention_mask, prompt)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, eos_token_id: int,
                 sampling: lm.Sampling | None = None, with_prompt: bool = True) -> torch.Tensor:
        """Continue each (left-padded) row with up to max_new_tokens tokens (see `lm.generate`)."""
        prompt = self.prompt() if with_prompt else None
        return lm.generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, prompt, sampling)

    def _inputs_with_prompt(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            token_type_ids: torch.Tensor | None, prompt: torch.Tensor | None
                            ) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
        """(model inputs, real-token mask, attention mask, token type ids, position offset) with the prompt in."""
        if prompt is None:
            return {"input_ids": input_ids}, attention_mask, attention_mask, token_type_ids, 0
        if self.kind == "prefix":  # real tokens come after the prefix, as with a cache of n positions
            return ({"input_ids": input_ids, "softprompt_prefix": prompt}, attention_mask, attention_mask,
                    token_type_ids, prompt.shape[-2])
        batch, n, at = input_ids.shape[0], prompt.shape[-2], self.insert_at
        embeds = self.base.get_input_embeddings()(input_ids)
        virtual = prompt.to(embeds.dtype).expand(batch, -1, -1)
        ones = attention_mask.new_ones(batch, n)
        if token_type_ids is not None:
            token_type_ids = _insert(token_type_ids, ones * 0, at)
        return ({"inputs_embeds": _insert(embeds, virtual, at)}, _insert(attention_mask, ones * 0, at),
                _insert(attention_mask, ones, at), token_type_ids, 0)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None,
               prompt: torch.Tensor | None, cache: Any = None) -> Encoded:
        """Run the frozen model with a soft prompt: shared by all rows ([n, d] or [layers, 2, 1, ...]) or
        one per row ([B, n, d] or [layers, 2, B, ...]: several tasks in one batch); None: no prompt.
        With a `cache`, a decoder keeps the keys and values of the input (not of a prefix) for generation."""
        batch = input_ids.shape[0]
        inputs, real_tokens, attention_mask, token_type_ids, offset = self._inputs_with_prompt(
            input_ids, attention_mask, token_type_ids, prompt)
        if self.is_decoder:
            positions = (attention_mask.cumsum(-1) - 1).clamp(min=0) + offset
            # A decoder would otherwise build a KV cache in every training step.
            inputs.update({self.cache_argument: cache, "use_cache": cache is not None})
        else:
            positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)[None] + offset
        inputs.update(attention_mask=attention_mask, position_ids=positions.expand(batch, -1))
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        next_position = attention_mask.sum(-1) + offset
        if self.head_reads_model_pooler:
            # The model's own head pipeline ([CLS] pooler, dropout) runs; a hook keeps the head's input.
            if self.first_token_only:
                inputs["softprompt_first_token"] = True
            self.base(**inputs)
            states, self.head.softprompt_input = self.head.softprompt_input, None
            return Encoded(states, real_tokens, attention_mask, next_position)
        return Encoded(self.base.base_model(**inputs).last_hidden_state, real_tokens, attention_mask, next_position)

    def classify(self, encoded: Encoded, head_state: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits from encoded rows; `head_state` swaps in another task's head weights."""
        if self.head_reads_model_pooler:
            features = encoded.states
        elif self.pooling == "model":  # decoder: the last real token, wherever the padding is
            features = heads.last_real_token(encoded.states, encoded.attention_mask)
        else:
            features = self.head_dropout(heads.mean_features(encoded.states, encoded.real_tokens, self.pooling))
        if head_state is None:
            return self.head(features)
        return torch.func.functional_call(self.head, head_state, (features,))
