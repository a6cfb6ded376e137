"""The causal-LM side of a soft-prompt model: label-word scores (rank classification) and generation.

Functions of a SoftPromptModel (passed in; this module does not import it): they need its `encode`,
`lm_head`, `kind`, `base` and `cache_argument`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache


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


@torch.no_grad()
def label_word_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt: torch.Tensor | None,
                      words: list[list[int]]) -> torch.Tensor:
    """Each label word's log-likelihood after each (left-padded) input: [rows, labels] (`words`: each label's
    token ids)."""
    if all(len(w) == 1 for w in words):  # one forward pass: the next-token distribution after the input
        last = model.encode(input_ids, attention_mask, None, prompt).states[:, -1]
        return model.lm_head(last).float().log_softmax(-1)[:, [w[0] for w in words]]
    # Multi-token words: each row once per label, the word appended (inputs are left-padded, words right-padded).
    batch, count, width = input_ids.shape[0], len(words), max(map(len, words))
    pad = model.base.config.pad_token_id or 0
    word_ids = torch.tensor([w + [pad] * (width - len(w)) for w in words], device=input_ids.device).repeat(batch, 1)
    word_mask = (torch.arange(width, device=input_ids.device)[None] < torch.tensor(
        [len(w) for w in words], device=input_ids.device)[:, None]).long().repeat(batch, 1)
    if prompt is not None and model.kind == "input" and prompt.dim() == 3:  # one prompt per row: per copy too
        prompt = prompt.repeat_interleave(count, 0)
    ids = torch.cat([input_ids.repeat_interleave(count, 0), word_ids], 1)
    mask = torch.cat([attention_mask.repeat_interleave(count, 0), word_mask], 1)
    states = model.encode(ids, mask, None, prompt).states[:, -width - 1:-1]
    log_probs = model.lm_head(states).float().log_softmax(-1).gather(-1, word_ids[..., None]).squeeze(-1)
    return (log_probs * word_mask).sum(-1).view(batch, count)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, eos_token_id: int,
             prompt: torch.Tensor | None, sampling: Sampling | None = None) -> torch.Tensor:
    """Continue each (left-padded) row with up to max_new_tokens tokens, through a KV cache: [B, new] token ids,
    padded after EOS. Greedy unless `sampling` is given. The cache holds the input only; a prefix reaches the
    attention function at every step, as in training."""
    cache = DynamicCache(config=model.base.config)
    encoded = model.encode(input_ids, attention_mask, None, prompt, cache=cache)
    mask, position = encoded.attention_mask, encoded.next_position
    logits = model.lm_head(encoded.states[:, -1])
    batch = input_ids.shape[0]
    done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    tokens = []
    while True:
        token = sampling.choose(logits.float()) if sampling else logits.argmax(-1)
        token = token.masked_fill(done, model.base.config.pad_token_id or 0)
        tokens.append(token)
        done |= token == eos_token_id
        if done.all() or len(tokens) == max_new_tokens:
            return torch.stack(tokens, 1)
        mask = torch.cat([mask, mask.new_ones(batch, 1)], 1)
        inputs = dict(input_ids=token[:, None], attention_mask=mask, position_ids=position[:, None],
                      use_cache=True, **{model.cache_argument: cache})
        position = position + 1
        if prompt is not None and model.kind == "prefix":
            inputs["softprompt_prefix"] = prompt
        logits = model.lm_head(model.base.base_model(**inputs).last_hidden_state[:, -1])
