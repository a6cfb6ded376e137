"""What every row of a decoder's batch shares, computed once for all rows instead of once in each: the virtual
tokens of an input prompt, and the leading tokens every row has alike.

A template puts the same text before every row's own words ("Review: {sentence}", an instruction, a chat
template's header). Behind a causal mask, and after a prefix every row sees alike, those leading tokens never see
what follows them: their hidden states and keys and values are the same in every row. So one copy of them runs
first in the rows' pass (`shared_pass`), every row attends to its keys and values as to a prefix, and runs only the
tokens after them. Same logits and gradients, for len(rows) - 1 fewer copies of those positions. A loaded soft
prompt's virtual tokens for inference run once when it is loaded (`SoftPromptModel.virtual_token_prefix`).

When that pays is `computing_once_pays`; the column helpers below serve `SoftPromptModel.encode`.
"""

from __future__ import annotations

import torch

COMPUTED_ONCE_MIN_POSITIONS = 16
"""Tokens that every row shares (a decoder's virtual tokens, a template's start) run once, first in the rows' pass,
when that saves at least this many positions, (rows - 1) x tokens. Running them apart from the rows has a cost that
positions do not tell (attention called twice a layer, the rows' keys and values lengthened): on a 2-core CPU
(SmolLM2-135M, training, 10 virtual tokens; scripts/bench_computed_once.py) even at 2 rows (10 positions saved),
1.04x faster at 4 rows, 1.12x at 8. On a GPU, where a small model's step is bound by launching kernels rather than
by positions, running them once cost more than it saved at every size measured, so rows run everything there
(H200, SmolLM2's shape, training: in a pass of their own, 0.47-0.55x with virtual tokens once and 0.51-0.78x with
shared template tokens once; first in the rows' pass, 0.67-0.81x and 0.75-0.99x)."""

ONCE_DEVICE_TYPES = {"cpu"}
"""The devices where shared tokens may run once at all (see COMPUTED_ONCE_MIN_POSITIONS); a bench adds others to
measure them (scripts/bench_computed_once.py --any-device)."""


def is_prefix(prompt: torch.Tensor | None) -> bool:
    """Whether a prompt reaches the model as every layer's keys and values ([layers, 2, rows or 1, ...]), not as input
    embeddings ([n, d], or [rows, n, d])."""
    return prompt is not None and prompt.dim() > 3


def computing_once_pays(device: torch.device, rows: int, tokens: int, also_saved: int = 0) -> bool:
    """Whether running `tokens` that all `rows` share once, first in their pass, is worth it (see
    COMPUTED_ONCE_MIN_POSITIONS); `also_saved`: positions it saves besides (padding that rows behind it leave out
    when packed)."""
    return device.type in ONCE_DEVICE_TYPES and (rows - 1) * tokens + also_saved >= COMPUTED_ONCE_MIN_POSITIONS


def first_real_column(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each row's first real (not padding) column: [rows]."""
    return attention_mask.int().argmax(-1)


def shared_leading_count(input_ids: torch.Tensor, attention_mask: torch.Tensor, starts: torch.Tensor) -> int:
    """How many real tokens, counted from each row's first, every row has alike; at most one fewer than the
    shortest row's, so that every row keeps a token of its own."""
    limit = int(attention_mask.sum(-1).min()) - 1
    if len(input_ids) < 2 or limit < 1:
        return 0
    columns = starts[:, None] + torch.arange(limit, device=starts.device)
    ids, real = input_ids.gather(1, columns), attention_mask.gather(1, columns).bool()
    alike = (ids == ids[:1]).all(0) & real.all(0)
    return int(alike.long().cumprod(0).sum())


def without_leading(values: torch.Tensor, starts: torch.Tensor, count: int) -> torch.Tensor:
    """Each row of `values` ([rows, length, ...]) without the `count` columns from its `starts` on; rows keep their
    padding where it was (left padding stays on the left, right padding on the right)."""
    columns = torch.arange(values.shape[1] - count, device=values.device)[None]
    source = columns + count * (columns >= starts[:, None])
    return _gather_columns(values, source)


def with_leading(states: torch.Tensor, leading: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """The inverse of `without_leading` for hidden states: `leading` ([1, count, hidden], the shared tokens'
    states) put back into every row ([rows, length - count, hidden]) from its `starts` on."""
    count, narrow = leading.shape[1], states.shape[1]
    columns = torch.arange(narrow + count, device=states.device)[None]
    offset = columns - starts[:, None]
    inside = (offset >= 0) & (offset < count)
    source = torch.where(inside, narrow + offset, torch.where(offset < 0, columns, columns - count))
    rows = torch.cat([states, leading.to(states.dtype).expand(len(states), -1, -1)], dim=1)
    return _gather_columns(rows, source)


def _gather_columns(values: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    index = source.view(*source.shape, *([1] * (values.dim() - 2))).expand(-1, -1, *values.shape[2:])
    return values.gather(1, index)
