"""The attention function behind every method: attention dropout that keeps less for the backward pass."""

from types import SimpleNamespace

import pytest
import torch

from softprompt_cli.model import attention
from softprompt_cli.model.attention import DropoutAttention, dropout_attention
from softprompt_cli.model.dropout import MaskDrawer


def reference(query, key, value, mask, scale, keep, dropout):
    scores = query @ key.transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
    return (scores.softmax(-1) * keep / (1 - dropout)) @ value


def inputs(batch=2, heads=3, queries=5, keys=5, dim=4, kv_heads=None):
    torch.manual_seed(0)
    return (torch.randn(batch, heads, queries, dim, dtype=torch.float64, requires_grad=True),
            torch.randn(batch, kv_heads or heads, keys, dim, dtype=torch.float64, requires_grad=True),
            torch.randn(batch, kv_heads or heads, keys, dim, dtype=torch.float64, requires_grad=True))


def padding_mask(kind: str):
    real = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])[:, None, None, :].expand(2, 1, 5, 5)
    additive = torch.zeros(real.shape, dtype=torch.float64).masked_fill(~real, -1e9)
    return {"none": None, "bool": real, "additive": additive}[kind]


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
def test_dropout_attention_gives_the_reference_output_and_gradients(mask_kind):
    query, key, value = inputs()
    mask, scale, dropout = padding_mask(mask_kind), 0.7, 0.3
    torch.manual_seed(11)
    ours = DropoutAttention.apply(query, key, value, mask, scale, dropout)
    torch.manual_seed(11)  # the keep-mask is the first thing drawn
    keep = MaskDrawer(query.device).keep(torch.empty(ours.shape[:-1] + (key.shape[2],), dtype=torch.bool), dropout)
    assert 0 < keep.sum() < keep.numel()
    expected = reference(query, key, value, mask, scale, keep, dropout)
    torch.testing.assert_close(ours, expected)
    grad = torch.randn_like(ours)
    ours_grads = torch.autograd.grad(ours, (query, key, value), grad)
    expected_grads = torch.autograd.grad(expected, (query, key, value), grad)
    for got, want in zip(ours_grads, expected_grads):
        torch.testing.assert_close(got, want)


def test_dropout_attention_handles_grouped_heads_and_the_causal_pattern():
    query, key, value = inputs(heads=4, kv_heads=2, queries=3, keys=5)  # 2 keys in front: a prefix or a cache
    module = SimpleNamespace(num_key_value_groups=2, is_causal=True)
    torch.manual_seed(3)
    ours, _ = dropout_attention(module, query, key, value, None, dropout=0.2)
    torch.manual_seed(3)
    keep = MaskDrawer(query.device).keep(torch.empty(2, 4, 3, 5, dtype=torch.bool), 0.2)
    causal = torch.ones(3, 5, dtype=torch.bool).tril(2)[None, None]
    expected = reference(query, key.repeat_interleave(2, 1), value.repeat_interleave(2, 1), causal, 0.5, keep, 0.2)
    torch.testing.assert_close(ours, expected.transpose(1, 2))


def saved_bytes(function) -> int:
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function()
    return sum(storages.values())


def test_dropout_attention_keeps_less_than_sdpa_for_the_backward_pass():
    query, key, value = (torch.randn(4, 6, 64, 16, requires_grad=True) for _ in range(3))
    mask = torch.ones(4, 1, 64, 64, dtype=torch.bool)
    sdpa = saved_bytes(lambda: torch.nn.functional.scaled_dot_product_attention(query, key, value, mask, 0.1))
    ours = saved_bytes(lambda: DropoutAttention.apply(query, key, value, mask, 0.25, 0.1))
    scores = 4 * 6 * 64 * 64
    assert ours <= 5 * scores + 3 * query.nbytes + mask.nbytes
    assert ours < 0.6 * sdpa


def run_keeping_mask(query, key, value, mask, scale, dropout, grad):
    """DropoutAttention's output, the gradients of (query, key, value) for `grad`, and the keep-mask it drew
    (read from what it saved for the backward pass: the one boolean tensor)."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        output = DropoutAttention.apply(query, key, value, mask, scale, dropout)
    keep = next(t for t in saved if t.dtype == torch.bool and t.dim() == 4 and t.shape[1] == query.shape[1])
    return output, torch.autograd.grad(output, (query, key, value), grad), keep


@pytest.mark.parametrize("chunk_bytes", [8 * 5 * 7, 3 * 8 * 5 * 7, 2**20])  # one head, 3 heads of a row, all
@pytest.mark.parametrize("mask_kind", ["padding", "per_head", "causal", "additive"])
def test_chunked_dropout_attention_gives_the_reference_output_and_gradients(monkeypatch, chunk_bytes, mask_kind):
    """Chunks of one head, of some heads of a row and of whole rows, each mask broadcast its own way."""
    monkeypatch.setattr(attention, "SCORE_CHUNK_BYTES", chunk_bytes)
    query, key, value = inputs(batch=3, heads=4, queries=5, keys=7)
    real = torch.rand(3, 4, 5, 7, generator=torch.Generator().manual_seed(1)) > 0.3
    mask = {"padding": real[:, :1], "per_head": real, "causal": torch.ones(5, 7, dtype=torch.bool).tril(2)[None, None],
            "additive": torch.zeros(3, 1, 5, 7, dtype=torch.float64).masked_fill(~real[:, :1], -1e9)}[mask_kind]
    grad = torch.randn(3, 4, 5, 4, dtype=torch.float64)
    ours, ours_grads, keep = run_keeping_mask(query, key, value, mask, 0.7, 0.3, grad)
    assert 0 < keep.sum() < keep.numel()
    expected = reference(query, key, value, mask, 0.7, keep, 0.3)
    torch.testing.assert_close(ours, expected)
    for got, want in zip(ours_grads, torch.autograd.grad(expected, (query, key, value), grad)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunks_compute_what_one_chunk_computes(monkeypatch, dtype):
    """The same keep-mask from the same seed, and the same output and gradients as the whole tensor at once."""
    query, key, value = (t.detach().to(dtype).requires_grad_() for t in inputs(batch=3, heads=4, queries=6, keys=9))
    mask = torch.ones(3, 1, 6, 9, dtype=torch.bool)
    mask[1, ..., -4:] = False
    grad = torch.randn(3, 4, 6, 4).to(dtype)
    results = []
    for chunk_bytes in (2**20, 2 * 6 * 9 * query.element_size()):
        monkeypatch.setattr(attention, "SCORE_CHUNK_BYTES", chunk_bytes)
        torch.manual_seed(5)
        results.append(run_keeping_mask(query, key, value, mask, 0.5, 0.1, grad))
    (whole, whole_grads, whole_keep), (chunked, chunked_grads, chunked_keep) = results
    assert torch.equal(whole_keep, chunked_keep)
    torch.testing.assert_close(chunked, whole)
    for got, want in zip(chunked_grads, whole_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(("shape", "chunk_bytes", "expected_chunks"), [
    ((16, 12, 77, 77), None, 1),                # 10 virtual tokens on an MRPC batch: one chunk, as before chunking
    ((16, 12, 138, 138), None, 1),              # 10 virtual tokens and 128 real ones: one chunk
    ((16, 12, 267, 267), None, 4),              # 200 virtual tokens: 4 batch rows (13.7 MB) at a time
    ((16, 12, 267, 267), 2 * 2**20, 16 * 2),    # 2 MB: 6 heads of one row at a time
    ((2, 12, 1024, 1024), 8 * 2**20, 2 * 6),    # long rows: 2 heads (8 MB) at a time
    ((2, 3, 4, 4), 1, 2 * 3),                   # below one head: one head at a time
])
def test_score_chunks_cover_every_row_and_head_once_in_memory_order(shape, chunk_bytes, expected_chunks, monkeypatch):
    if chunk_bytes is not None:
        monkeypatch.setattr(attention, "SCORE_CHUNK_BYTES", chunk_bytes)
    chunk_bytes = attention.SCORE_CHUNK_BYTES
    chunks = attention.score_chunks(shape, 4)
    covered = torch.zeros(shape[:2], dtype=torch.long)
    flat_order = torch.arange(shape[0] * shape[1]).view(shape[:2])
    starts = []
    for rows, heads in chunks:
        covered[rows, heads] += 1
        starts.append(int(flat_order[rows, heads].min()))
        one_head = covered[rows, heads].numel() == 1
        assert one_head or covered[rows, heads].numel() * shape[2] * shape[3] * 4 <= chunk_bytes
    assert len(chunks) == expected_chunks
    assert bool((covered == 1).all())
    assert starts == sorted(starts)


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
def test_bf16_training_attention_on_cpu_runs_sdpa_in_float32(monkeypatch, mask_kind):
    """Under bf16 autocast with gradients, the CPU's SDPA gets float32 inputs (its bf16 backward is several times
    slower), returns bf16, and gives float32 attention's output and gradients on the same bf16 inputs."""
    seen = sdpa_dtypes(monkeypatch)
    query, key, value = (t.detach().to(torch.bfloat16).requires_grad_() for t in inputs())
    mask = padding_mask(mask_kind)
    mask = mask.float() if mask is not None and mask.is_floating_point() else mask
    module = SimpleNamespace(num_key_value_groups=1, is_causal=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, _ = attention.softprompt_attention(module, query, key, value, mask, dropout=0.0, scaling=0.5)
    assert seen == [torch.float32] and ours.dtype == torch.bfloat16
    upcast = [t.detach().float().requires_grad_() for t in (query, key, value)]
    expected = reference(*upcast, mask, 0.5, torch.ones(2, 3, 5, 5, dtype=torch.bool), 0.0).transpose(1, 2)
    torch.testing.assert_close(ours.float(), expected, atol=1e-2, rtol=1e-2)
    grad = torch.randn(expected.shape)
    ours_grads = torch.autograd.grad(ours, (query, key, value), grad.to(torch.bfloat16))
    for got, want in zip(ours_grads, torch.autograd.grad(expected, upcast, grad)):
        torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)

    seen.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # inference keeps bf16: its forward is faster
        attention.softprompt_attention(module, query, key, value, mask, dropout=0.0, scaling=0.5)
    assert seen == [torch.bfloat16]


def test_bf16_training_of_a_rotary_model_on_cpu_runs_sdpa_in_float32(monkeypatch, tiny_models):
    """Llama multiplies its bf16 query and key projections by float32 cos and sin, so under autocast the query
    reaching attention is float32 and the value bf16: autocast, not the query's dtype, decides that SDPA would
    run in bf16. Training gives SDPA float32 in every layer; inference keeps bf16."""
    from tests.test_causal_lm import METHODS, build

    seen = sdpa_dtypes(monkeypatch)
    model, tokenizer = build(tiny_models["llama"], METHODS["prefix_tuning"])
    rows = dict(tokenizer(["a fine film good", "dull good"], padding=True, return_tensors="pt"))
    labels = rows["input_ids"].clone()
    labels[:, :-1] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.train()(**rows, labels=labels)["loss"].backward()
    assert seen and set(seen) == {torch.float32}
    seen.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.eval()(**rows, labels=labels)
    assert seen and set(seen) == {torch.bfloat16}


def sdpa_dtypes(monkeypatch) -> list[torch.dtype]:
    """The dtype of every SDPA call from now on (autocast's where it is on, else its inputs'), in a list."""
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(query, key, value, *args, **kwargs):
        if torch.is_autocast_enabled("cpu"):
            seen.append(torch.get_autocast_dtype("cpu"))
        else:
            (dtype,) = {t.dtype for t in (query, key, value)}
            seen.append(dtype)
        return sdpa(query, key, value, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    return seen
