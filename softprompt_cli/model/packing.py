"""A decoder's rows packed together, without padding, behind a prefix they all share.

Shuffled batches of sentences are mostly padding: on SST-2 with SmolLM2 (batch 16), about half of every padded
batch's positions are, and each costs what a real token costs. Length-grouped batches avoid that but cost accuracy
(README: the SmolLM2 grouping table). Behind a causal mask, after a prefix every row sees alike (a prompt's virtual
tokens computed once, prefix tuning's keys and values, shared template tokens), a row's states depend on nothing but
its own tokens and their positions. So the rows of a batch are packed into a few rows of about `PACKED_ROW_TOKENS`
tokens (longest first, each into the shortest), each token keeping its own position id, under a mask that lets a
token attend to the prefix and to the earlier tokens of its own row only: every row's states, loss and gradients are
those it has alone, for the real tokens' positions alone.

The order of the tokens inside a packed row does not matter to the model (the mask and the position ids say
everything), so the tokens whose states are read (`read_tail`'s columns: the positions that predict a label word)
go last, where the last layer can finish only them (see `read_tail`). `unpack` puts the states read back where the
padded batch had them. Leading tokens that every row has alike (a template's start) run once in each packed row,
before its rows' own tokens, which all attend to them: one copy a packed row instead of one a row, where that
costs less than one copy first in the pass that every packed row attends to (`shared_pass`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PACKED_ROW_TOKENS = 256
"""About how many tokens a packed row holds: a batch's rows go into as few packed rows as hold their tokens at this
many each, balanced (a packed row can come out a little longer). Attention over a packed row costs its length
squared: at 256, counting the products, the extra attention is under a tenth of a SmolLM2 step."""
PACKING_MIN_SAVED_SHARE = {"cpu": 0.2, "cuda": 0.5}
"""By device type: rows are packed where that saves at least this share of the padded batch's positions; below it,
building the mask and the longer attention rows are not worth it (length-grouped batches, evaluation's
longest-first order). Other devices never pack. On a GPU a small model's step is bound by launching kernels more
than by positions: on an NVIDIA H200 (SmolLM2's shape, prefix tuning, shuffled SST-2 batches; scripts/gpu_bundle/run.sh
packing) packed training steps ran 1.31-1.33x faster than padded ones in float32 and 1.54-1.64x under bf16 autocast
at 54-62% padding (batches of 16 and 64), but 1.01x and 0.83x at 35% (batches of 4)."""
SEVERAL_PROMPTS_PACKING_DEVICE_TYPES = {"cpu"}
"""The devices where rows of several prompts (each packed row one prompt's) may pack: measured on CPUs alone."""
PACKED_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gpt2"}
"""Decoders whose models take a 4D attention mask as it is (transformers' masking_utils) and place tokens by their
position ids alone, so that they run packed rows, and shared positions first in the rows' pass (`shared_pass`):
Llama, GPT-2 and Gemma 3 are tested against their padded rows; Mistral's and Qwen's code is Llama's."""


@dataclass
class Packing:
    """Rows packed into `input_ids` [packed rows, width]: what the model runs, and how to put its states back."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    """[packed rows, 1, width, width], True where a query may attend to a key: its own row's earlier tokens, and
    the shared leading tokens run first in its packed row (`pack`'s `shared`)."""
    read: int
    """How many of each packed row's last columns hold the states to read."""
    source: torch.Tensor
    """[rows, columns read]: where each of the padded batch's read columns is among the read states, flattened
    ([packed rows * read]); -1 for padding."""
    representative: torch.Tensor
    """[packed rows]: a row in each packed row, whose prompt is its packed row's (all its rows share one)."""


def balanced(lengths: list[int], count: int) -> list[int]:
    """The packed row of each row, `count` packed rows: longest rows first, each into the packed row that holds the
    fewest tokens so far, so that packed rows come out of about equal length and pad little."""
    loads = [0] * count
    packed_row = [0] * len(lengths)
    for row in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        packed_row[row] = loads.index(min(loads))
        loads[packed_row[row]] += lengths[row]
    return packed_row


def packed_width(attention_mask: torch.Tensor, groups: list[int] | None = None) -> tuple[list[int], int, int]:
    """(each row's packed row, how many packed rows, their width) of a padded batch's rows: as few packed rows as
    hold their tokens at PACKED_ROW_TOKENS each, for each group of rows apart (`groups`: each row's; rows with
    different prompts never share a packed row)."""
    lengths = attention_mask.sum(-1).tolist()
    groups = groups or [0] * len(lengths)
    packed_row, count = [0] * len(lengths), 0
    for group in dict.fromkeys(groups):
        members = [row for row, its in enumerate(groups) if its == group]
        group_count = max(1, -(-sum(lengths[row] for row in members) // PACKED_ROW_TOKENS))
        for row, packed in zip(members, balanced([lengths[row] for row in members], group_count)):
            packed_row[row] = count + packed
        count += group_count
    totals = [0] * count
    for row, length in zip(packed_row, lengths):
        totals[row] += length
    return packed_row, count, max(totals)


def positions_saved(attention_mask: torch.Tensor, groups: list[int] | None = None) -> int:
    """How many of these padded rows' positions packing them leaves out, where that is at least
    PACKING_MIN_SAVED_SHARE of them on their device; else 0 (the rows run padded)."""
    least_share = PACKING_MIN_SAVED_SHARE.get(attention_mask.device.type)
    if least_share is None or len(attention_mask) < 2:
        return 0
    if groups is not None and attention_mask.device.type not in SEVERAL_PROMPTS_PACKING_DEVICE_TYPES:
        return 0
    _, count, width = packed_width(attention_mask, groups)
    saved = attention_mask.numel() - count * width
    return saved if saved >= least_share * attention_mask.numel() else 0


def sampled_batch_masks(lengths: list[int], batch_size: int, count: int = 32) -> list[torch.Tensor]:
    """The attention masks of `count` batches of rows of these `lengths` drawn at random, as shuffled batches are
    (seeded: the same draw every time)."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.tensor(lengths)
    draws = [rows[torch.randperm(len(rows), generator=generator)[:batch_size]] for _ in range(count)]
    return [(torch.arange(int(drawn.max())) < drawn[:, None]).long() for drawn in draws]


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, first_position: int, read_tail: int | None,
         shared: int = 0, groups: list[int] | None = None) -> Packing:
    """The real tokens of padded rows (any padding side) packed, positions counted from `first_position` (the
    prefix's length) in each row, as `SoftPromptModel` counts them unpacked. `read_tail=n`: the states of each
    padded row's last n columns are read (None: every column's). `shared`: how many leading tokens every row has
    alike; they run once, first in each packed row, where all its rows attend to them (the columns read must be
    the rows' own tokens). `groups`: which prompt each row has, where rows have different ones (see
    `packed_width`)."""
    rows, length = input_ids.shape
    positions = (attention_mask.cumsum(-1) - 1) + first_position
    own = attention_mask.bool() & (positions >= first_position + shared)
    packed_row, count, width = packed_width(own, groups)
    width += shared
    row, column = own.nonzero(as_tuple=True)  # row by row, column by column
    into = torch.tensor(packed_row, device=input_ids.device)[row]
    is_read = column >= length - read_tail if read_tail else torch.ones_like(column, dtype=torch.bool)
    # inside a packed row, tokens not read first, then those read; row by row, column by column in each part
    order = ((into * 2 + is_read) * (rows * length) + row * length + column).argsort()
    row, column, into, is_read = row[order], column[order], into[order], is_read[order]
    per_packed_row = torch.bincount(into, minlength=count)
    first_of_packed_row = per_packed_row.cumsum(0) - per_packed_row
    slot = torch.arange(len(row), device=row.device) - first_of_packed_row[into] + (width - per_packed_row[into])
    input_ids_packed, position_ids, owner = (input_ids.new_zeros(count, width) for _ in range(3))
    input_ids_packed[into, slot], position_ids[into, slot] = input_ids[row, column], positions[row, column]
    owner[into, slot] = row + 1
    shared_columns = _put_shared(input_ids, attention_mask, first_position, shared, input_ids_packed, position_ids,
                                 owner)
    # padding (owner 0) attends to padding: no query is left with nothing to attend to
    mask = (owner[:, :, None] == owner[:, None, :]) & (position_ids[:, None, :] <= position_ids[:, :, None])
    is_row = (owner > 0) & (owner <= rows)
    mask |= is_row[:, :, None] & (owner[:, None, :] == rows + 1)  # every row's tokens see all shared ones
    read = max(1, int(torch.bincount(into[is_read], minlength=count).max())) if read_tail else width
    source = torch.full((rows, length), -1, dtype=torch.long, device=input_ids.device)
    source[row[is_read], column[is_read]] = into[is_read] * read + slot[is_read] - (width - read)
    if shared and read_tail:
        assert int(shared_columns.max()) < length - read_tail, "a shared token is in a column read"
    elif shared:  # every column read: the shared tokens' too, from the row's packed row
        each_row = torch.arange(rows, device=input_ids.device)[:, None]
        source[each_row, shared_columns] = torch.tensor(packed_row, device=input_ids.device)[:, None] * width + (
            torch.arange(shared, device=input_ids.device))
    representative = into.new_zeros(count)
    representative[into] = row
    return Packing(input_ids_packed, position_ids, mask[:, None], read, source[:, length - (read_tail or length):],
                   representative)


def _put_shared(input_ids: torch.Tensor, attention_mask: torch.Tensor, first_position: int, shared: int,
                input_ids_packed: torch.Tensor, position_ids: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """The `shared` leading tokens into the first columns of every packed row (their owner: one past the last row);
    returns where each row has them ([rows, shared] columns)."""
    columns = attention_mask.int().argmax(-1)[:, None] + torch.arange(shared, device=input_ids.device)
    input_ids_packed[:, :shared] = input_ids[0, columns[0]]
    position_ids[:, :shared] = first_position + torch.arange(shared, device=input_ids.device)
    owner[:, :shared] = len(input_ids) + 1
    return columns


def unpack(states: torch.Tensor, packing: Packing) -> torch.Tensor:
    """The read states of packed rows ([packed rows, read, hidden]) back in the padded batch's layout ([rows,
    columns read, hidden]; zeros where the padded batch has padding)."""
    flat = states.reshape(-1, states.shape[-1])
    gathered = flat[packing.source.clamp(min=0)]
    return gathered.masked_fill((packing.source < 0)[..., None], 0.0)
