"""softprompt's attention function, registered with transformers' attention interface for every method.

It adds two things to transformers' SDPA path:

- Prefix tuning: the prefix keys/values reach each attention layer as the keyword argument
  `softprompt_prefix` ([layers, 2, batch or 1, kv_heads, n, head_dim]), which transformers 5 forwards
  from the model's `forward` down to the attention function. Nothing is cached, so it works with
  gradient checkpointing, and the result equals passing the same prefix as a `DynamicCache`.
  A dict passed as `softprompt_capture` receives every layer's (keys, values) instead: the keys and
  values that a text leaves in the model, to start a prefix from.
- Attention dropout with less memory. The frozen model keeps its attention dropout while training (as
  PEFT does), but PyTorch's CPU SDPA cannot fuse dropout, so it falls back to a path that keeps three
  float [batch, heads, length, length] tensors per layer for the backward pass. `DropoutAttention`
  keeps the probabilities and a boolean keep-mask (5 bytes per score instead of 12), computes the
  same function and gradients, and works through long sequences in chunks (`SCORE_CHUNK_BYTES`).

The mask function must be registered under the same name too: transformers builds no attention
mask at all for attention implementations it does not know (padding would be silently ignored).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from softprompt_cli.model.dropout import MaskDrawer, kept

ATTENTION_NAME = "softprompt"


SCORE_CHUNK_BYTES = 16 * 2**20
"""The most bytes of attention scores `DropoutAttention` computes at once. Its [batch, heads, queries, keys]
temporaries grow with the square of the length, and past glibc's 32 MB mmap threshold (about 190 keys at batch
16 and 12 heads) each one is a fresh mmap whose every page faults in on first touch; unchunked, a layer made 9
of them per training step. Chunks of 16 MB stay on the heap. Smaller ones were no faster on 2 cores (4 MB: the
same step time) and slower where another process holds a core: every chunk calls the thread pool several
times, and each call waits for both threads."""


def _even_bounds(total: int, most_per_part: int) -> list[slice]:
    """0..total cut into the fewest parts of at most `most_per_part` (at least 1), as even as they come."""
    parts = -(-total // max(1, most_per_part))
    bounds = [total * i // parts for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def score_chunks(shape: tuple[int, int, int, int], element_size: int) -> list[tuple[slice, slice]]:
    """(batch rows, heads) slices of a [batch, heads, queries, keys] score tensor, each of at most
    SCORE_CHUNK_BYTES (or one head of one row, if that is more), in memory order: whole batch rows while a
    row fits, else heads of one row. Scores that fit are one chunk, computed as before chunking existed."""
    batch, heads, queries, keys = shape
    heads_per_chunk = SCORE_CHUNK_BYTES // (queries * keys * element_size)
    if heads_per_chunk < heads:
        return [(slice(row, row + 1), part) for row in range(batch) for part in _even_bounds(heads, heads_per_chunk)]
    return [(rows, slice(None)) for rows in _even_bounds(batch, heads_per_chunk // heads)]


def _part(tensor: torch.Tensor | None, rows: slice, heads: slice) -> torch.Tensor | None:
    """The chunk's rows and heads of a tensor that may broadcast over either (a [1 or batch, 1 or heads, ...] mask)."""
    if tensor is None:
        return None
    return tensor[rows if tensor.shape[0] > 1 else slice(None), heads if tensor.shape[1] > 1 else slice(None)]


def _attention_probs(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scale: float,
                     out: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ · scale + mask), written into `out`."""
    scores = torch.matmul(query, key.transpose(-1, -2)).mul_(scale)
    if mask is not None and mask.dtype == torch.bool:
        # the lowest finite value, not -inf: a row with nothing to attend to stays finite, as in SDPA
        scores = torch.where(mask, scores, torch.finfo(scores.dtype).min)
    elif mask is not None:
        scores.add_(mask)
    softmax_dtype = torch.promote_types(scores.dtype, torch.float32)
    if softmax_dtype == scores.dtype:
        return torch.softmax(scores, -1, out=out)
    # in half precision the softmax runs in float32, as transformers' eager attention does
    return out.copy_(torch.softmax(scores, -1, dtype=softmax_dtype))


class DropoutAttention(torch.autograd.Function):
    """softmax(q kᵀ · scale + mask) with dropout, times v; saves q, k, v, the probabilities and the keep-mask.

    Computed in chunks of batch rows and heads (`score_chunks`). The keep-mask is drawn chunk after chunk in
    memory order from one `MaskDrawer`: the same mask as drawn at once. Dropped scores are multiplied by the
    mask's bytes (`kept`): one pass, no float copy of the mask."""

    @staticmethod
    def forward(ctx, query, key, value, mask, scale: float, dropout: float):
        shape = (*query.shape[:3], key.shape[2])
        probs = query.new_empty(shape)
        keep = torch.empty(shape, dtype=torch.bool, device=query.device)
        output = query.new_empty(*shape[:3], value.shape[-1])
        masks = MaskDrawer(query.device)
        for rows, heads in score_chunks(shape, query.element_size()):
            chunk_keep = masks.keep(keep[rows, heads], dropout)
            chunk_probs = _attention_probs(query[rows, heads], key[rows, heads], _part(mask, rows, heads), scale,
                                           probs[rows, heads])
            torch.matmul(torch.mul(chunk_probs, kept(chunk_keep)), value[rows, heads], out=output[rows, heads])
        ctx.save_for_backward(query, key, value, probs, keep)
        ctx.scale, ctx.dropout = scale, dropout
        return output.div_(1 - dropout)

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, probs, keep = ctx.saved_tensors
        rescale = 1 / (1 - ctx.dropout)
        grad_query, grad_key, grad_value = (torch.empty(t.shape, dtype=t.dtype, device=t.device)
                                            for t in (query, key, value))
        for rows, heads in score_chunks(probs.shape, probs.element_size()):
            chunk_probs, chunk_keep, chunk_grad = probs[rows, heads], keep[rows, heads], grad_output[rows, heads]
            dropped = torch.mul(chunk_probs, kept(chunk_keep))
            torch.matmul(dropped.transpose(-1, -2), chunk_grad, out=grad_value[rows, heads])
            grad_dropped = torch.matmul(chunk_grad, value[rows, heads].transpose(-1, -2))
            grad_probs = grad_dropped.mul_(kept(chunk_keep)).mul_(rescale)
            grad_scores = torch._softmax_backward_data(grad_probs, chunk_probs, -1, probs.dtype).mul_(ctx.scale)
            torch.matmul(grad_scores, key[rows, heads], out=grad_query[rows, heads])
            torch.matmul(grad_scores.transpose(-1, -2), query[rows, heads], out=grad_key[rows, heads])
        return grad_query, grad_key, grad_value.mul_(rescale), None, None, None


def _causal_mask(query_length: int, key_length: int, device) -> torch.Tensor:
    # aligned to the end: with keys in front (a prefix, a cache) the last query sees every key
    ones = torch.ones(query_length, key_length, dtype=torch.bool, device=device)
    return ones.tril(key_length - query_length)[None, None]


def dropout_attention(module, query, key, value, attention_mask, dropout: float, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs):
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is None and is_causal and query.shape[2] > 1:
        attention_mask = _causal_mask(query.shape[2], key.shape[2], query.device)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    output = DropoutAttention.apply(query, key, value, attention_mask, scale, dropout)
    return output.transpose(1, 2).contiguous(), None


def softprompt_attention(module, query, key, value, attention_mask, softprompt_prefix=None, softprompt_capture=None,
                         softprompt_shared=0, softprompt_shared_blocks=None, **kwargs):
    if softprompt_capture is not None:  # init-prefix-from-text: keep every layer's keys and values
        softprompt_capture[module.layer_idx] = (key, value)
    prefix = None if softprompt_prefix is None else softprompt_prefix[module.layer_idx]
    if softprompt_shared:
        return _shared_then_rows_attention(module, query, key, value, attention_mask, prefix, softprompt_shared,
                                           softprompt_shared_blocks, **kwargs)
    if prefix is not None:
        key, value, attention_mask = _with_prefix(module, query, key, value, attention_mask, prefix)
        kwargs["is_causal"] = False
    return _attend(module, query, key, value, attention_mask, **kwargs)


def _shared_then_rows_attention(module, query, key, value, rows_mask, prefix, shared: int, blocks, **kwargs):
    """Attention over one sequence of `shared` positions that every row sees first, then the rows, flattened one
    after another (`model.shared_pass`): query, key and value [1, heads, shared + rows x width, head_dim],
    `rows_mask` the rows' own [rows, 1, width, width]. The shared positions attend causally among themselves (after
    the `prefix`, if any); each row to the prefix, to every shared position and, as `rows_mask` says, to its own.
    `blocks` (`shared_pass.TaskBlocks`): the shared positions are several prompts' blocks, each attending causally
    within itself, and each row sees its own block alone. Returns [1, positions, heads, head_dim], as an attention
    function does."""
    rows, prompts = rows_mask.shape[0], 1 if blocks is None else shared // blocks.length
    first = [_as_rows(part[:, :, :shared], prompts) for part in (query, key, value)]
    own = [_as_rows(part[:, :, shared:], rows) for part in (query, key, value)]
    first_key, first_value, first_mask = first[1], first[2], None
    if prefix is not None:
        first_key, first_value, first_mask = _with_prefix(module, *first, None, prefix)
    first_output, _ = _attend(module, first[0], first_key, first_value, first_mask, **kwargs)
    seen = (first_key, first_value)  # the prefix, then the shared positions: every row's to see
    if blocks is not None:  # each row its own prompt's block
        seen = (first_key[blocks.of_row], first_value[blocks.of_row])
    own_key, own_value, own_mask = _with_prefix(module, own[0], own[1], own[2], rows_mask, seen)
    kwargs["is_causal"] = False
    own_output, _ = _attend(module, own[0], own_key, own_value, own_mask, **kwargs)
    first_output = first_output.reshape(1, -1, *first_output.shape[2:])
    return torch.cat([first_output, own_output.reshape(1, -1, *own_output.shape[2:])], dim=1), None


def _as_rows(flat: torch.Tensor, rows: int) -> torch.Tensor:
    """[1, heads, rows x width, head_dim] as [rows, heads, width, head_dim] (a view)."""
    heads, positions, head_dim = flat.shape[1:]
    return flat[0].view(heads, rows, positions // rows, head_dim).transpose(0, 1)


def _attend(module, query, key, value, attention_mask, **kwargs):
    unusual = kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None
    if kwargs.get("dropout", 0.0) > 0 and not unusual:
        return dropout_attention(module, query, key, value, attention_mask, **kwargs)
    if _trains_in_bf16_on_cpu(query):
        return _float32_sdpa(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _trains_in_bf16_on_cpu(query: torch.Tensor) -> bool:
    """Gradients on, on a CPU, with SDPA bound to run in bf16: a bf16 model, or bf16 autocast, which casts SDPA's
    inputs itself. Under autocast the query itself is often float32 (rotary models multiply the bf16 projection by
    float32 cos and sin), so it is autocast that decides, not the query's dtype."""
    if query.device.type != "cpu" or not torch.is_grad_enabled():
        return False
    autocast_bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    return autocast_bf16 or query.dtype == torch.bfloat16


def _float32_sdpa(module, query, key, value, attention_mask, **kwargs):
    """SDPA in float32 on bf16 inputs, for training under bf16 autocast on a CPU. PyTorch's CPU flash-attention
    backward is 5 to 8 times slower in bf16 than in float32 (torch 2.13 on an AMX Xeon: 29 against 3.4 ms for 16
    rows x 12 heads x 64 tokens), and its forward no faster at these lengths; float32 is also the more exact of the
    two. The output goes back as bf16, as autocast would have given it."""
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast("cpu", enabled=False):  # autocast would cast SDPA's inputs back to bf16
        output, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                                 **kwargs)
    return output.to(torch.bfloat16), weights


def _with_prefix(module, query, key, value, attention_mask, prefix):
    prefix_key, prefix_value = prefix
    batch, _, query_length, _ = query.shape
    num_prefix, key_length = prefix_key.shape[-2], key.shape[2]
    key = torch.cat([prefix_key.to(key.dtype).expand(batch, -1, -1, -1), key], dim=2)
    value = torch.cat([prefix_value.to(value.dtype).expand(batch, -1, -1, -1), value], dim=2)
    if attention_mask is None and getattr(module, "is_causal", False) and query_length > 1:
        # The mask was skipped because SDPA's is_causal would do; with the prefix in front of the
        # keys is_causal would be misaligned, so spell the causal pattern out.
        attention_mask = _causal_mask(query_length, key_length, query.device)
    if attention_mask is not None:
        # Every query may attend to every prefix position: True in a boolean mask, 0 in an additive one.
        shape = (*attention_mask.shape[:3], num_prefix)
        fill = (
            torch.ones(shape, dtype=torch.bool, device=attention_mask.device)
            if attention_mask.dtype == torch.bool
            else torch.zeros(shape, dtype=attention_mask.dtype, device=attention_mask.device)
        )
        attention_mask = torch.cat([fill, attention_mask], dim=-1)
    return key, value, attention_mask


AttentionInterface.register(ATTENTION_NAME, softprompt_attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
