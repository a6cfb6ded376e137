"""What a classification head reads: the frozen model's hidden states pooled as the task says."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mean_features(states: torch.Tensor, real_tokens: torch.Tensor, pooling: str) -> torch.Tensor:
    """The mean of the real tokens' hidden states (`mean`), or Sentence-BERT pair features `[u, v, |u-v|, u*v]`
    of two separately encoded texts (`pair_mean`: rows are [first texts; second texts])."""
    weights = real_tokens.unsqueeze(-1).to(states.dtype)
    features = (states * weights).sum(1) / weights.sum(1).clamp(min=1)
    if pooling == "pair_mean":
        first, second = F.normalize(features, dim=-1).chunk(2)
        features = torch.cat([first, second, (first - second).abs(), first * second], dim=-1)
    return features


def mean_feature_size(pooling: str, hidden_size: int) -> int:
    return 4 * hidden_size if pooling == "pair_mean" else hidden_size


def last_real_token(states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Each row's hidden state at its last real token, wherever the padding is (decoders' own heads read it)."""
    index = torch.arange(attention_mask.shape[1], device=states.device)
    last_real = (index * attention_mask).argmax(-1)
    return states[torch.arange(len(last_real), device=last_real.device), last_real]
