"""The frozen base model plus a soft-prompt method plus a classification head: one SoftPromptModel.

The wrapper, not the methods, handles where virtual tokens go, attention masks, position ids,
token type ids and which hidden state the head reads.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from softprompt_cli import attention
from softprompt_cli.errors import UserError
from softprompt_cli.hub import hub_reachable, offline_model_error, resolve_model_reference
from softprompt_cli.init_prefix import prefix_from_ids, text_token_ids
from softprompt_cli.methods import MethodOptions

HEAD_MODULE_NAMES = ("pre_classifier", "classifier", "score")
_VOLATILE_CONFIG_KEYS = {
    "architectures", "id2label", "label2id", "num_labels", "problem_type", "torch_dtype", "dtype",
    "transformers_version", "pad_token_id", "use_cache", "finetuning_task", "output_attentions",
    "output_hidden_states", "return_dict",
}


@dataclass
class ModelSpec:
    """What a method needs to know about the base model to build its parameters."""

    hidden_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    input_embeddings: nn.Embedding
    tokenizer: Any
    fingerprint: str
    prefix_from_text: Callable[[str, int], torch.Tensor]
    """(text, n) -> the flat prefix [n, layers * 2 * kv_heads * head_dim] that the text leaves in the model."""


def _load(loader, reference: str, revision: str | None, **kwargs):
    location, local = resolve_model_reference(reference, revision)
    online = not local and hub_reachable()
    try:
        return loader.from_pretrained(location, revision=None if local else revision,
                                      local_files_only=not online, **kwargs)
    except OSError as err:
        if not local and not online:
            raise offline_model_error(reference) from None
        raise UserError(f"could not load {reference!r}: {err}") from None


def load_tokenizer(reference: str, revision: str | None = None, trust_remote_code: bool = False):
    tokenizer = _load(AutoTokenizer, reference, revision, trust_remote_code=trust_remote_code)
    if getattr(tokenizer, "vocab_size", len(tokenizer)) == 0:  # what transformers builds from no tokenizer files
        raise UserError(f"model {reference!r} has no tokenizer (no tokenizer files next to its config). Save the "
                        "tokenizer into the model folder (tokenizer.save_pretrained).")
    if tokenizer.pad_token is None:
        # Decoder tokenizers (GPT-2, Llama) have no pad token; the mask makes the choice irrelevant.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_config(reference: str, revision: str | None = None, trust_remote_code: bool = False):
    return _load(AutoConfig, reference, revision, trust_remote_code=trust_remote_code)


def config_fingerprint(config) -> str:
    """A hash of the architecture-defining config values, to refuse checkpoints made for another model."""
    values = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS and not k.startswith("_")}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _is_decoder(model: nn.Module) -> bool:
    return any(getattr(m, "is_causal", False) for m in model.modules() if hasattr(m, "layer_idx"))


def load_base_model(reference: str, *, revision: str | None, dtype: str, trust_remote_code: bool,
                    pooling: str, label_names: list[str], prefix: bool) -> nn.Module:
    hf_logging.set_verbosity_error()  # "newly initialized head" warnings are expected here
    hf_logging.disable_progress_bar()
    kwargs: dict[str, Any] = dict(dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
    if prefix:
        kwargs["attn_implementation"] = attention.ATTENTION_NAME
    if pooling == "model":
        kwargs.update(num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                      label2id={name: i for i, name in enumerate(label_names)})
        try:
            return _load(AutoModelForSequenceClassification, reference, revision, **kwargs)
        except ValueError as err:  # an architecture without a sequence-classification class
            raise UserError(f"{reference!r} has no sequence-classification head ({err}). "
                            "Use task.pooling: mean, which adds a head of its own.") from None
    return _load(AutoModel, reference, revision, **kwargs)  # mean / pair_mean: a head of our own


def _keep_head_input(head: nn.Module, args: tuple) -> None:
    head.softprompt_input = args[0]


@dataclass
class Encoded:
    """The frozen model's output for a batch of rows, before pooling and head."""

    states: torch.Tensor
    """Last hidden states [rows, length, hidden], or the input of the model's own head."""
    real_tokens: torch.Tensor
    """1 for real (not virtual, not padding) tokens."""
    attention_mask: torch.Tensor


class SoftPromptModel(nn.Module):
    """A frozen transformer, a trainable soft prompt, and a trainable classification head."""

    def __init__(self, base: nn.Module, method: MethodOptions, tokenizer, pooling: str, num_labels: int,
                 max_length: int, prompt_position: str = "after_special"):
        super().__init__()
        self.base = base
        self.pooling = pooling
        self.kind = method.kind
        self.num_virtual_tokens = method.num_virtual_tokens
        self.is_decoder = _is_decoder(base)
        config = base.config.get_text_config()
        if self.is_decoder and getattr(base.config, "pad_token_id", None) is None:
            base.config.pad_token_id = tokenizer.pad_token_id
        if not self.is_decoder:
            # Encoders read [CLS] at index 0 and take positions from the index: pad on the right.
            tokenizer.padding_side = "right"
        max_positions = getattr(config, "max_position_embeddings", None)
        if max_positions and method.num_virtual_tokens + max_length > max_positions:
            raise UserError(
                f"method.num_virtual_tokens ({method.num_virtual_tokens}) + data.max_length ({max_length}) exceeds "
                f"the model's {max_positions} positions. Lower one of them."
            )
        base.requires_grad_(False)
        spec = ModelSpec(
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            input_embeddings=base.get_input_embeddings(),
            tokenizer=tokenizer,
            fingerprint=config_fingerprint(base.config),
            prefix_from_text=lambda text, n: prefix_from_ids(base, text_token_ids(tokenizer, text), n),
        )
        self.prompt = method.build(spec)
        # Virtual tokens go after a leading [CLS]/<s> in encoders, so that the model's own head still
        # reads [CLS]; decoders read the last token, so the prompt simply goes first.
        probe = tokenizer("x")["input_ids"]
        leading_special = bool(probe) and probe[0] in tokenizer.all_special_ids
        self.insert_at = 1 if (prompt_position == "after_special" and not self.is_decoder and leading_special) else 0
        self.head_reads_model_pooler = pooling == "model" and not self.is_decoder
        if pooling in ("mean", "pair_mean"):
            self.head_dropout = nn.Dropout(getattr(config, "hidden_dropout_prob", 0.1) or 0.0)
            features = 4 * config.hidden_size if pooling == "pair_mean" else config.hidden_size
            self.head = nn.Linear(features, num_labels)
        else:
            heads = [name for name in HEAD_MODULE_NAMES if hasattr(base, name)]
            if len(heads) != 1:
                raise UserError(f"{type(base).__name__} has no single classifier/score head ({heads}). "
                                "Use task.pooling: mean, which adds a head of its own.")
            # Registered on the base model only: the head's weights are saved as base.<name>.*
            object.__setattr__(self, "head", getattr(base, heads[0]))
            self.head.requires_grad_(True)
            if self.head_reads_model_pooler and not hasattr(self.head, "softprompt_input"):
                self.head.softprompt_input = None
                self.head.register_forward_pre_hook(_keep_head_input)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.trainable_state())
        if set(state) != expected:
            raise UserError(f"checkpoint tensors {sorted(state)} do not match this model's {sorted(expected)}.")
        self.load_state_dict(state, strict=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        encoded = self.encode(input_ids, attention_mask, token_type_ids, self.prompt())
        output = {"logits": self.classify(encoded)}
        if labels is not None:
            output["loss"] = F.cross_entropy(output["logits"].float(), labels)
        return output

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None,
               prompt: torch.Tensor) -> Encoded:
        """Run the frozen model with a soft prompt: shared by all rows ([n, d] or [layers, 2, 1, ...]) or
        one per row ([B, n, d] or [layers, 2, B, ...]: several tasks in one batch)."""
        batch = input_ids.shape[0]
        n = self.num_virtual_tokens
        inputs: dict[str, Any] = {}
        real_tokens = attention_mask
        if self.kind == "input":
            embeds = self.base.get_input_embeddings()(input_ids)
            virtual = prompt.to(embeds.dtype).expand(batch, -1, -1)
            at = self.insert_at
            ones = attention_mask.new_ones(batch, n)
            inputs["inputs_embeds"] = torch.cat([embeds[:, :at], virtual, embeds[:, at:]], dim=1)
            real_tokens = torch.cat([attention_mask[:, :at], ones * 0, attention_mask[:, at:]], dim=1)
            attention_mask = torch.cat([attention_mask[:, :at], ones, attention_mask[:, at:]], dim=1)
            if token_type_ids is not None:
                token_type_ids = torch.cat([token_type_ids[:, :at], ones * 0, token_type_ids[:, at:]], dim=1)
            offset = 0
        else:
            inputs["input_ids"] = input_ids
            inputs["softprompt_prefix"] = prompt
            offset = n  # real tokens come after the prefix, as with a cache of n positions
        if self.is_decoder:
            positions = (attention_mask.cumsum(-1) - 1).clamp(min=0) + offset
        else:
            positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)[None] + offset
        inputs.update(attention_mask=attention_mask, position_ids=positions.expand(batch, -1))
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        if self.head_reads_model_pooler:
            # The model's own head pipeline ([CLS] pooler, dropout) runs; a hook keeps the head's input.
            self.base(**inputs)
            states, self.head.softprompt_input = self.head.softprompt_input, None
            return Encoded(states, real_tokens, attention_mask)
        return Encoded(self.base.base_model(**inputs).last_hidden_state, real_tokens, attention_mask)

    def classify(self, encoded: Encoded, head_state: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits from encoded rows; `head_state` swaps in another task's head weights."""
        if self.head_reads_model_pooler:
            features = encoded.states
        elif self.pooling == "model":  # decoder: the last real token, wherever the padding is
            index = torch.arange(encoded.attention_mask.shape[1], device=encoded.states.device)
            last_real = (index * encoded.attention_mask).argmax(-1)
            features = encoded.states[torch.arange(len(last_real), device=last_real.device), last_real]
        else:
            weights = encoded.real_tokens.unsqueeze(-1).to(encoded.states.dtype)
            features = (encoded.states * weights).sum(1) / weights.sum(1).clamp(min=1)
            if self.pooling == "pair_mean":  # rows are [first texts; second texts]
                first, second = F.normalize(features, dim=-1).chunk(2)
                features = torch.cat([first, second, (first - second).abs(), first * second], dim=-1)
            features = self.head_dropout(features)
        if head_state is None:
            return self.head(features)
        return torch.func.functional_call(self.head, head_state, (features,))
