"""Positions that every row of a decoder's batch sees first, run once, in the same pass as the rows.

A decoder's virtual tokens placed first, and the leading tokens a template gives every row alike, have the same
states, keys and values in every row (`computed_once`). They used to run once in a pass of their own, whose keys and
values then reached the rows as a prefix: fewer positions, but a whole second pass through every layer, whose
hundreds of small operations cost on a 2-core CPU what about 80 more positions in the batch cost (SmolLM2-135M:
~150 ms of a ~1.5 s training step for 12 positions). Here they go into the rows' own pass instead: the batch becomes
one sequence, the shared positions first, then every row (padded or packed) one after another. Norms, projections
and feed-forward layers work position by position, so they run the shared positions once among the rows' for the
cost of those positions alone; only attention needs the rows apart, and softprompt's attention function
(`attention.softprompt_attention`, told how many positions are shared) gives each row the shared positions' keys
and values first, as a prefix, and the shared positions their own causal attention. Same states, loss and
gradients as every row running them itself.

Rows of several prompts (a batch of several tasks, each with its own prompt) see several blocks of shared positions
instead, one prompt's after another's (`TaskBlocks`): each block attends causally within itself alone (the blocks
run side by side, as rows of their own), at the positions its prompt would have in a row, and each row attends to
its own prompt's block alone.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class TaskBlocks(NamedTuple):
    """Shared positions that are several prompts of `length` positions each, one block after another: which block
    each row (padded or packed) sees, `of_row` [rows]."""

    length: int
    of_row: torch.Tensor

    def positions(self, start: int, shared: int) -> torch.Tensor:
        """Each shared position's position id: its place in its block, after `start` (a prefix)."""
        return start + torch.arange(shared, device=self.of_row.device) % self.length


def causal_rows_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Padded rows' own attention as a [rows, 1, width, width] boolean mask: each real key at or before the query,
    as transformers' mask for the rows gives it. A padding query may see no key of its row; it still sees the shared
    positions, so no query is left with nothing to attend to."""
    width = attention_mask.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=attention_mask.device).tril()
    return (causal[None] & attention_mask.bool()[:, None, :])[:, None]


def read_index(shared: int, rows: int, width: int, read: int) -> torch.Tensor:
    """Where each row's last `read` columns are in the sequence of `shared` positions then `rows` rows of `width`."""
    starts = shared + width * torch.arange(rows)[:, None]
    return (starts + torch.arange(width - read, width)).flatten()


def shared_pass_inputs(shared_embeds: torch.Tensor, start: int, rows_embeds: torch.Tensor,
                       rows_positions: torch.Tensor, rows_mask: torch.Tensor, read: int | None,
                       blocks: TaskBlocks | None = None) -> dict:
    """A decoder's inputs for `shared_embeds` ([1, n, hidden], at positions from `start`; `blocks`: several prompts'
    blocks) then the rows ([rows, width, hidden], their position ids and own [rows, 1, width, width] mask) in one
    sequence, and (`read`) the last layer finishing each row's last `read` columns alone (`read_tail`). The 4D mask
    goes to the attention function as it is (transformers builds no mask from a 4D one)."""
    rows, width = rows_embeds.shape[:2]
    count = shared_embeds.shape[1]
    shared_positions = (torch.arange(start, start + count, device=rows_embeds.device) if blocks is None
                        else blocks.positions(start, count))
    inputs = {
        "inputs_embeds": torch.cat([shared_embeds[0].to(rows_embeds.dtype), rows_embeds.flatten(0, 1)])[None],
        "position_ids": torch.cat([shared_positions, rows_positions.flatten()])[None],
        "attention_mask": rows_mask,
        "softprompt_shared": count,
    }
    if blocks is not None:
        inputs["softprompt_shared_blocks"] = blocks
    if read:
        inputs["softprompt_read_tail"] = read_index(shared_embeds.shape[1], rows, width, read).to(rows_embeds.device)
    return inputs


def split_states(states: torch.Tensor, shared: int, rows: int, read: int | None
                 ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(the shared positions' states [1, shared, hidden], None where the last layer finished the `read` columns
    alone; the rows' [rows, columns, hidden]) from the last states of a shared pass ([1, positions, hidden])."""
    if read:
        return None, states.view(rows, read, states.shape[-1])
    return states[:, :shared], states[0, shared:].view(rows, -1, states.shape[-1])
