"""Building blocks shared by the method modules (imports torch; loaded only by `build`)."""

from __future__ import annotations

import torch
from torch import nn

from softprompt_cli.errors import UserError

VOCABULARY_CHUNK_ROWS = 16384
"""Rows embedded at once when measuring the vocabulary's spread (Gemma 3's 262,144 rows: 16 passes)."""


class Vocabulary:
    """The frozen input embeddings as the model's first layer receives them, to start prompts from.

    Rows go through the embedding module, not its weight: Gemma 3 (and BART-style `scale_embedding`) multiply the
    table by a scale in the module's forward, so a prompt started from raw weight rows would be that factor too
    small (Gemma 3 270M: 25x). PEFT starts its prompts through the module too."""

    def __init__(self, embedding: nn.Module):
        self.embedding = embedding
        self.size, self.width = embedding.weight.shape

    @torch.no_grad()
    def rows(self, ids) -> torch.Tensor:
        """The embeddings of token ids, as a new float32 tensor."""
        return self.embedding(torch.as_tensor(ids, device=self.embedding.weight.device)).float()

    def sample(self, count: int) -> torch.Tensor:
        """Random rows, drawn with the global torch RNG."""
        return self.rows(torch.randint(0, self.size, (count,)))

    def text(self, tokenizer, text: str, count: int) -> torch.Tensor:
        """The embeddings of a text's tokens, repeated or cut to `count` rows."""
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise UserError(f"method.init_text {text!r} tokenizes to nothing; give a real text.")
        return self.rows((ids * (count // len(ids) + 1))[:count])

    def random(self, count: int) -> torch.Tensor:
        """Gaussian vectors with the spread of the vocabulary's embeddings."""
        return torch.randn(count, self.width) * self._std()

    @torch.no_grad()
    def _std(self) -> float:
        """The standard deviation of every embedded value, a chunk of rows at a time (no second table in memory):
        each chunk's mean and squared deviations, pooled (Chan et al.'s parallel variance)."""
        parts = []
        for start in range(0, self.size, VOCABULARY_CHUNK_ROWS):
            values = self.rows(torch.arange(start, min(start + VOCABULARY_CHUNK_ROWS, self.size)))
            variance, mean = torch.var_mean(values, correction=0)
            parts.append((values.numel(), mean.item(), variance.item()))
        count = sum(n for n, _, _ in parts)
        mean = sum(n * m for n, m, _ in parts) / count
        squares = sum(n * (v + (m - mean) ** 2) for n, m, v in parts)
        return (squares / (count - 1)) ** 0.5


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
