"""The causal-LM side of a soft-prompt model: label-word scores (rank classification) and generation.

Functions of a SoftPromptModel (passed in; this module does not import it): they need its `encode`,
`lm_head`, `kind`, `base` and `cache_argument`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from softprompt_cli.model.computed_once import is_prefix


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
        # Draw where the generator lives (a seeded CPU one draws the same tokens whatever runs the model).
        device = self.generator.device if self.generator is not None else logits.device
        chosen = torch.multinomial(logits.softmax(-1).to(device), 1, generator=self.generator).squeeze(-1)
        return chosen.to(logits.device)


def float32_logits(model, states: torch.Tensor) -> torch.Tensor:
    """The LM head's logits in float32 even under bf16/fp16 autocast (unless the model itself is in half
    precision). Label-word scores are differences of log-probabilities, which half precision rounds to steps of
    1/16 to 1/8 at the usual logit sizes: two different SmolLM2 rows both came out 0.880797 (a difference of
    exactly 2), and two label words can tie."""
    head = model.lm_head
    with torch.autocast(states.device.type, enabled=False):
        return head(states.to(next(head.parameters()).dtype)).float()


@torch.no_grad()
def label_word_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt: torch.Tensor | None,
                      words: list[list[int]]) -> torch.Tensor:
    """Each label word's log-likelihood after each (left-padded) input: [rows, labels] (`words`: each label's
    token ids)."""
    if all(len(w) == 1 for w in words):  # one forward pass: the next-token distribution after the input
        last = model.encode(input_ids, attention_mask, None, prompt, read_tail=1).states[:, -1]
        return float32_logits(model, last).log_softmax(-1)[:, [w[0] for w in words]]
    # Multi-token words: each row once per label, the word appended (inputs are left-padded, words right-padded).
    batch, count, width = input_ids.shape[0], len(words), max(map(len, words))
    pad = model.base.config.pad_token_id or 0
    word_ids = torch.tensor([w + [pad] * (width - len(w)) for w in words], device=input_ids.device).repeat(batch, 1)
    word_mask = (torch.arange(width, device=input_ids.device)[None] < torch.tensor(
        [len(w) for w in words], device=input_ids.device)[:, None]).long().repeat(batch, 1)
    if prompt is not None and prompt.dim() == 3:  # one prompt per row: per copy too
        prompt = prompt.repeat_interleave(count, 0)
    elif is_prefix(prompt) and prompt.shape[2] > 1:
        prompt = prompt.repeat_interleave(count, 2)
    ids = torch.cat([input_ids.repeat_interleave(count, 0), word_ids], 1)
    mask = torch.cat([attention_mask.repeat_interleave(count, 0), word_mask], 1)
    states = model.encode(ids, mask, None, prompt, read_tail=width + 1).states[:, :-1]
    log_probs = float32_logits(model, states).log_softmax(-1).gather(-1, word_ids[..., None]).squeeze(-1)
    return (log_probs * word_mask).sum(-1).view(batch, count)


@dataclass
class Decoding:
    """Rows being continued token by token: their KV cache (of the input, not of a prefix), attention mask
    over the cache, next position ids, and the prefix a prefix-kind prompt gives every step (else None)."""

    cache: DynamicCache
    attention_mask: torch.Tensor
    next_position: torch.Tensor
    prefix: torch.Tensor | None


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt: torch.Tensor | None
            ) -> tuple[Decoding, torch.Tensor]:
    """Run (left-padded) rows with their prompt through the model once, keeping a KV cache: the decoding state
    and the logits of each row's next token."""
    cache = DynamicCache(config=model.base.config)
    encoded = model.encode(input_ids, attention_mask, None, prompt, cache=cache, read_tail=1)
    prefix = prompt if is_prefix(prompt) else None
    state = Decoding(cache, encoded.attention_mask, encoded.next_position, prefix)
    return state, model.lm_head(encoded.states[:, -1])


@torch.no_grad()
def decode_step(model, state: Decoding, tokens: torch.Tensor) -> torch.Tensor:
    """Append one token to each row (updating `state`): the logits of each row's next token."""
    batch = len(tokens)
    state.attention_mask = torch.cat([state.attention_mask, state.attention_mask.new_ones(batch, 1)], 1)
    inputs = dict(input_ids=tokens[:, None], attention_mask=state.attention_mask,
                  position_ids=state.next_position[:, None], use_cache=True, **{model.cache_argument: state.cache})
    state.next_position = state.next_position + 1
    if state.prefix is not None:  # a prefix reaches the attention function at every step, as in training
        inputs["softprompt_prefix"] = state.prefix
    return model.lm_head(model.base.base_model(**inputs).last_hidden_state[:, -1])


def stop_token_ids(base, tokenizer) -> tuple[int, ...]:
    """The tokens that end a generation: the tokenizer's EOS and every end token of the model's generation config,
    as transformers' generate and vLLM stop. Instruction-tuned models end a turn with a token of their own (Gemma's
    <end_of_turn>, Llama 3's <|eot_id|>) that their generation config lists beside EOS."""
    configured = getattr(getattr(base, "generation_config", None), "eos_token_id", None)
    ids = [tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])]
    return tuple(dict.fromkeys(i for i in ids if i is not None))


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
             stop_ids: int | Sequence[int], prompt: torch.Tensor | None, sampling: Sampling | None = None
             ) -> torch.Tensor:
    """Continue each (left-padded) row with up to max_new_tokens tokens, through a KV cache: [B, new] token ids,
    padded after the first of `stop_ids` (see `stop_token_ids`). Greedy unless `sampling` is given."""
    state, logits = prefill(model, input_ids, attention_mask, prompt)
    done = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
    stop = torch.as_tensor(stop_ids, device=input_ids.device)
    tokens = []
    while True:
        token = sampling.choose(logits.float()) if sampling else logits.argmax(-1)
        token = token.masked_fill(done, model.base.config.pad_token_id or 0)
        tokens.append(token)
        done |= torch.isin(token, stop)
        if done.all() or len(tokens) == max_new_tokens:
            return torch.stack(tokens, 1)
        logits = decode_step(model, state, token)


def _left_pad(values: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """`values` padded with zeros at the start of `dim` to `length`."""
    missing = length - values.shape[dim]
    if missing == 0:
        return values
    shape = list(values.shape)
    shape[dim] = missing
    return torch.cat([values.new_zeros(shape), values], dim)


def merge_decoding(running: Decoding, joining: Decoding) -> None:
    """Add `joining`'s rows to `running` (both of prompts of one kind): caches left-padded to one length, the
    padding masked out. Keys carry their positions (rotary) or need none, so padding moves nothing."""
    length = max(running.attention_mask.shape[1], joining.attention_mask.shape[1])
    for ours, theirs in zip(running.cache.layers, joining.cache.layers):
        ours.keys = torch.cat([_left_pad(ours.keys, length, -2), _left_pad(theirs.keys, length, -2)])
        ours.values = torch.cat([_left_pad(ours.values, length, -2), _left_pad(theirs.values, length, -2)])
    running.attention_mask = torch.cat([_left_pad(running.attention_mask, length, 1),
                                        _left_pad(joining.attention_mask, length, 1)])
    running.next_position = torch.cat([running.next_position, joining.next_position])
    if running.prefix is not None:  # [layers, 2, rows, ...]
        running.prefix = torch.cat([running.prefix, joining.prefix], dim=2)


def keep_rows(state: Decoding, rows: torch.Tensor) -> None:
    """Keep only `rows` (indices) of `state`, and drop the cache columns no remaining row attends to."""
    mask = state.attention_mask[rows]
    first = int(mask.any(0).long().argmax())  # the first column some row still reads
    for layer in state.cache.layers:
        layer.keys = layer.keys[rows, :, first:]
        layer.values = layer.values[rows, :, first:]
    state.attention_mask = mask[:, first:]
    state.next_position = state.next_position[rows]
    if state.prefix is not None:
        state.prefix = state.prefix[:, :, rows]


def until_stop(tokens: list[int], stop_ids: Sequence[int]) -> list[int]:
    """A generated row's tokens before its first end token: end tokens from a generation config need not be
    special tokens, which decoding would skip."""
    return next((tokens[:i] for i, token in enumerate(tokens) if token in stop_ids), tokens)


PROMPT_CONTEXT_TOKENS = 6
"""Prompt tokens decoded before a continuation (vLLM's incremental detokenizer starts from a few the same way)."""


def continuation_text(tokenizer, prompt_ids: list[int], new_ids: list[int], head: str | None = None) -> str:
    """The text `new_ids` add after `prompt_ids`. Decoded alone, a continuation loses what the tokenizer's decoder
    puts before its first token (SentencePiece and WordPiece decoders drop a text's leading space: ' positive'
    came out 'positive'), so it is decoded after the prompt's last tokens and their own text (`head`, if already
    decoded) cut off; decoded alone where that text is not a prefix."""
    context = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
    head = tokenizer.decode(context, skip_special_tokens=True) if head is None else head
    whole = tokenizer.decode(context + list(new_ids), skip_special_tokens=True)
    return whole[len(head):] if whole.startswith(head) else tokenizer.decode(new_ids, skip_special_tokens=True)
