"""Building blocks shared by the method modules (imports torch; loaded only by `build`)."""

from __future__ import annotations

import torch
from torch import nn


class VirtualTokens(nn.Module):
    """Trainable virtual token vectors, optionally reparameterized by an encoder.

    `embedding` is always the training form (what the optimizer updates); `forward` returns the
    inference form, the encoder's output when there is an encoder.
    """

    def __init__(self, init: torch.Tensor, encoder: nn.Module | None = None):
        super().__init__()
        self.embedding = nn.Parameter(init)
        self.encoder = encoder

    def forward(self) -> torch.Tensor:
        return self.embedding if self.encoder is None else self.encoder(self.embedding)


class LstmMlp(nn.Module):
    """Bidirectional LSTM over the virtual tokens, then a two-layer MLP back to the model width."""

    def __init__(self, width: int, hidden: int, num_layers: int, dropout: float):
        super().__init__()
        self.lstm = nn.LSTM(width, hidden, num_layers=num_layers, dropout=dropout if num_layers > 1 else 0.0,
                            bidirectional=True, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, width))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.lstm(tokens[None])[0][0])


def mlp(width_in: int, hidden: int, width_out: int, num_hidden_layers: int, activation: type[nn.Module],
        dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = width_in
    for _ in range(num_hidden_layers):
        layers += [nn.Linear(width, hidden), activation()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = hidden
    layers.append(nn.Linear(width, width_out))
    return nn.Sequential(*layers)


def vocabulary_sample(embeddings: torch.Tensor, count: int) -> torch.Tensor:
    """Rows of the (frozen) input embedding matrix, drawn with the global torch RNG."""
    rows = torch.randint(0, embeddings.shape[0], (count,))
    return embeddings[rows].clone()


def random_like_vocabulary(embeddings: torch.Tensor, count: int) -> torch.Tensor:
    """Gaussian vectors with the scale of the vocabulary's embeddings."""
    return torch.randn(count, embeddings.shape[1]) * embeddings.float().std()


class PrefixLayout(nn.Module):
    """Views prefix vectors [n, layers * 2 * kv_heads * head_dim] as [layers, 2, 1, kv_heads, n, head_dim].

    The flat layout is PEFT's: per virtual token, layer i's key then value, heads then head_dim.
    """

    def __init__(self, tokens: VirtualTokens, num_layers: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.tokens = tokens
        self.shape = (num_layers, 2, num_kv_heads, head_dim)

    def forward(self) -> torch.Tensor:
        flat = self.tokens()
        return flat.view(flat.shape[0], *self.shape).permute(1, 2, 3, 0, 4)[:, :, None]


class TaskPrompts(nn.Module):
    """Multitask prompt tuning's prompts: a shared prompt `embedding` P [N, d] times each task's low-rank matrix
    `task_cols[k] @ task_rows[k]` ([N, r] @ [r, d]), element-wise."""

    def __init__(self, shared: torch.Tensor, task_cols: torch.Tensor, task_rows: torch.Tensor):
        super().__init__()
        self.embedding = nn.Parameter(shared)
        self.task_cols = nn.Parameter(task_cols)
        self.task_rows = nn.Parameter(task_rows)

    def forward(self, task_ids: torch.Tensor) -> torch.Tensor:
        """Each row's task's prompt: [rows, N, d]."""
        return self.embedding[None] * torch.matmul(self.task_cols[task_ids], self.task_rows[task_ids])
