"""The frozen base model plus a soft-prompt method plus a classification head (or, for causal_lm, the
model's own LM head): one SoftPromptModel.

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
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification,
                          AutoTokenizer, DynamicCache)
from transformers.utils import logging as hf_logging

from softprompt_cli import attention
from softprompt_cli.errors import UserError
from softprompt_cli.first_token import enable_first_token_only
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


def _load(loader, reference: str, revision: str | None, gguf_file: str | None = None, **kwargs):
    location, local = resolve_model_reference(reference, revision, gguf_file)
    online = not local and hub_reachable()
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    try:
        return loader.from_pretrained(location, revision=None if local else revision,
                                      local_files_only=not online, **kwargs)
    except OSError as err:
        if not local and not online:
            raise offline_model_error(reference) from None
        raise UserError(f"could not load {reference!r}: {err}") from None


def load_tokenizer(reference: str, revision: str | None = None, trust_remote_code: bool = False,
                   gguf_file: str | None = None):
    tokenizer = _load(AutoTokenizer, reference, revision, gguf_file, trust_remote_code=trust_remote_code)
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


def _is_decoder_config(config) -> bool:
    """Decoder-only: the model type has a causal-LM class and is not an encoder that merely can be one (BERT's
    BertLMHeadModel attends both ways unless is_decoder is set)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    encoder_like = config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not config.is_decoder
    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not encoder_like


def load_base_model(reference: str, *, revision: str | None, dtype: str, trust_remote_code: bool,
                    pooling: str, label_names: list[str], task_type: str = "sequence_classification",
                    gguf_file: str | None = None) -> nn.Module:
    hf_logging.set_verbosity_error()  # "newly initialized head" warnings are expected here
    hf_logging.disable_progress_bar()
    kwargs: dict[str, Any] = dict(dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code,
                                  attn_implementation=attention.ATTENTION_NAME)
    if task_type == "causal_lm":
        config = _load(AutoConfig, reference, revision, gguf_file, trust_remote_code=trust_remote_code)
        if config.is_encoder_decoder or not _is_decoder_config(config):
            raise UserError(f"{reference!r} is a {config.model_type} model, which does not generate text left to "
                            "right: task.type: causal_lm needs a decoder-only model (GPT-2, Llama, Qwen, SmolLM, "
                            "Gemma, ...). Use task.type: sequence_classification with this model.")
        try:
            return _load(AutoModelForCausalLM, reference, revision, gguf_file, **kwargs)
        except ValueError as err:
            raise UserError(f"{reference!r} has no causal language-model class ({err}).") from None
    if pooling == "model":
        kwargs.update(num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                      label2id={name: i for i, name in enumerate(label_names)})
        try:
            return _load(AutoModelForSequenceClassification, reference, revision, gguf_file, **kwargs)
        except ValueError as err:  # an architecture without a sequence-classification class
            raise UserError(f"{reference!r} has no sequence-classification head ({err}). "
                            "Use task.pooling: mean, which adds a head of its own.") from None
    return _load(AutoModel, reference, revision, gguf_file, **kwargs)  # mean / pair_mean: a head of our own


def enable_checkpointing(base: nn.Module) -> None:
    """Activation checkpointing, non-reentrant: it needs no input that requires grad, and replays the
    forward arguments (the prefix reaches the attention layers as one, not as a cache)."""
    if hasattr(base, "activation_checkpointing_enable"):  # the current name; where it exists, the older one warns
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


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
    next_position: torch.Tensor | None = None
    """Decoders: the position id of a token appended to each row."""


@dataclass
class Sampling:
    """Sampling settings for generation: temperature, then top-k, then nucleus (top-p) filtering."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    generator: torch.Generator | None = None

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits / self.temperature
        if self.top_k:
            kth = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -torch.inf)
        if self.top_p < 1.0:
            ordered, order = logits.sort(dim=-1, descending=True)
            # Drop a token once the tokens ranked above it already hold top_p of the probability.
            above = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)
            logits = logits.scatter(-1, order, ordered.masked_fill(above >= self.top_p, -torch.inf))
        return torch.multinomial(logits.softmax(-1), 1, generator=self.generator).squeeze(-1)


class SoftPromptModel(nn.Module):
    """A frozen transformer and a trainable soft prompt, plus a trainable classification head
    (sequence_classification) or the model's own next-token predictions (causal_lm)."""

    def __init__(self, base: nn.Module, method: MethodOptions, tokenizer, pooling: str, num_labels: int,
                 max_length: int, prompt_position: str = "after_special",
                 task_type: str = "sequence_classification", label_word_ids: list[list[int]] | None = None):
        super().__init__()
        self.base = base
        self.pooling = pooling
        self.kind = method.kind
        self.num_virtual_tokens = method.num_virtual_tokens
        self.is_decoder = _is_decoder(base)
        self.causal_lm = task_type == "causal_lm"
        self.label_word_ids = label_word_ids
        """causal_lm with label words: each label's tokens, scored for rank classification."""
        config = base.config.get_text_config()
        if self.is_decoder and getattr(base.config, "pad_token_id", None) is None:
            base.config.pad_token_id = tokenizer.pad_token_id
        if self.causal_lm and tokenizer.eos_token_id is None:  # free-form targets end with it; generation stops there
            eos = base.config.eos_token_id
            eos = eos[0] if isinstance(eos, list) else eos
            if eos is None:
                raise UserError("the model and its tokenizer define no end-of-sequence token, which causal_lm needs "
                                "(targets end with it). Set eos_token in the tokenizer files.")
            tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
        if self.causal_lm:  # generation appends to every row at once: pad on the left
            tokenizer.padding_side = "left"
        elif not self.is_decoder:  # encoders read [CLS] at index 0 and take positions from the index
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
        if self.causal_lm:
            self.head = None
        elif pooling in ("mean", "pair_mean"):
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
        # the head reads [CLS] alone: the last layer need not compute the other tokens
        self.first_token_only = self.head_reads_model_pooler and enable_first_token_only(base)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.trainable_state())
        if set(state) != expected:
            raise UserError(f"checkpoint tensors {sorted(state)} do not match this model's {sorted(expected)}.")
        self.load_state_dict(state, strict=False)

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
        words = self.label_word_ids
        if all(len(w) == 1 for w in words):  # one forward pass: the next-token distribution after the input
            last = self.encode(input_ids, attention_mask, None, prompt).states[:, -1]
            return self.lm_head(last).float().log_softmax(-1)[:, [w[0] for w in words]]
        # Multi-token words: each row once per label, the word appended (inputs are left-padded, words right-padded).
        batch, count, width = input_ids.shape[0], len(words), max(map(len, words))
        pad = self.base.config.pad_token_id or 0
        word_ids = torch.tensor([w + [pad] * (width - len(w)) for w in words], device=input_ids.device).repeat(batch, 1)
        word_mask = (torch.arange(width, device=input_ids.device)[None] < torch.tensor(
            [len(w) for w in words], device=input_ids.device)[:, None]).long().repeat(batch, 1)
        ids = torch.cat([input_ids.repeat_interleave(count, 0), word_ids], 1)
        mask = torch.cat([attention_mask.repeat_interleave(count, 0), word_mask], 1)
        states = self.encode(ids, mask, None, prompt).states[:, -width - 1:-1]
        log_probs = self.lm_head(states).float().log_softmax(-1).gather(-1, word_ids[..., None]).squeeze(-1)
        return (log_probs * word_mask).sum(-1).view(batch, count)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, eos_token_id: int,
                 sampling: Sampling | None = None, with_prompt: bool = True) -> torch.Tensor:
        """Continue each (left-padded) row with up to max_new_tokens tokens, through a KV cache: [B, new]
        token ids, padded after EOS. Greedy unless `sampling` is given."""
        prompt = self.prompt() if with_prompt else None
        cache = DynamicCache(config=self.base.config)
        encoded = self.encode(input_ids, attention_mask, None, prompt, cache=cache)
        mask = encoded.attention_mask
        position = encoded.next_position
        logits = self.lm_head(encoded.states[:, -1])
        batch = input_ids.shape[0]
        done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        tokens = []
        while True:
            token = sampling.choose(logits.float()) if sampling else logits.argmax(-1)
            token = token.masked_fill(done, self.base.config.pad_token_id or 0)
            tokens.append(token)
            done |= token == eos_token_id
            if done.all() or len(tokens) == max_new_tokens:
                return torch.stack(tokens, 1)
            mask = torch.cat([mask, mask.new_ones(batch, 1)], 1)
            inputs = dict(input_ids=token[:, None], attention_mask=mask, position_ids=position[:, None],
                          past_key_values=cache, use_cache=True)
            position = position + 1
            if prompt is not None and self.kind == "prefix":
                inputs["softprompt_prefix"] = prompt
            logits = self.lm_head(self.base.base_model(**inputs).last_hidden_state[:, -1])

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None,
               prompt: torch.Tensor | None, cache: DynamicCache | None = None) -> Encoded:
        """Run the frozen model with a soft prompt: shared by all rows ([n, d] or [layers, 2, 1, ...]) or
        one per row ([B, n, d] or [layers, 2, B, ...]: several tasks in one batch); None: no prompt.
        With a `cache`, a decoder keeps the keys and values of the input (not of a prefix) for generation."""
        batch = input_ids.shape[0]
        inputs: dict[str, Any] = {}
        real_tokens = attention_mask
        offset = 0
        if prompt is None:
            inputs["input_ids"] = input_ids
        elif self.kind == "input":
            n = prompt.shape[-2]
            embeds = self.base.get_input_embeddings()(input_ids)
            virtual = prompt.to(embeds.dtype).expand(batch, -1, -1)
            at = self.insert_at
            ones = attention_mask.new_ones(batch, n)
            inputs["inputs_embeds"] = torch.cat([embeds[:, :at], virtual, embeds[:, at:]], dim=1)
            real_tokens = torch.cat([attention_mask[:, :at], ones * 0, attention_mask[:, at:]], dim=1)
            attention_mask = torch.cat([attention_mask[:, :at], ones, attention_mask[:, at:]], dim=1)
            if token_type_ids is not None:
                token_type_ids = torch.cat([token_type_ids[:, :at], ones * 0, token_type_ids[:, at:]], dim=1)
        else:
            inputs["input_ids"] = input_ids
            inputs["softprompt_prefix"] = prompt
            offset = prompt.shape[-2]  # real tokens come after the prefix, as with a cache of n positions
        if self.is_decoder:
            positions = (attention_mask.cumsum(-1) - 1).clamp(min=0) + offset
            # A decoder would otherwise build a KV cache in every training step.
            inputs.update(past_key_values=cache, use_cache=cache is not None)
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
