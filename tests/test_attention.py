"""The attention function behind every method: attention dropout that keeps less for the backward pass."""

from types import SimpleNamespace

import pytest
import torch

from softprompt_cli.model.attention import DropoutAttention, dropout_attention


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
    keep = torch.empty(ours.shape[:-1] + (key.shape[2],), dtype=torch.bool).bernoulli_(1 - dropout)
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
    keep = torch.empty(2, 4, 3, 5, dtype=torch.bool).bernoulli_(0.8)
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
