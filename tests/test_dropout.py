"""Dropout with cheaper CPU masks: nn.Dropout's function, masks that follow torch's seed, swapped into models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from softprompt_cli.model.dropout import Dropout, MaskDrawer, use_fast_dropout
from softprompt_cli.model.loading import load_base_model, load_tokenizer, prepare_frozen
from tests.test_attention import saved_bytes

CPU = torch.device("cpu")


def drawn_keep(seed: int, shape, p: float) -> torch.Tensor:
    torch.manual_seed(seed)
    return MaskDrawer(CPU).keep(torch.empty(shape, dtype=torch.bool), p)


def test_dropout_scales_what_it_keeps_and_gives_the_matching_gradient():
    inputs = torch.randn(4, 7, 9, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(1)
    output = Dropout(0.3)(inputs)
    keep = drawn_keep(1, inputs.shape, 0.3)
    assert 0 < keep.sum() < keep.numel()
    torch.testing.assert_close(output, inputs * keep / 0.7)
    grad = torch.randn_like(output)
    (got,) = torch.autograd.grad(output, inputs, grad)
    torch.testing.assert_close(got, grad * keep / 0.7)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_masks_drop_at_the_rate_asked_for(p):
    keep = drawn_keep(0, (1_000_000,), p)
    dropped = 1 - keep.double().mean().item()
    assert abs(dropped - p) < 0.002  # six standard deviations of a binomial mean at p = 0.5


def test_masks_follow_torch_seed_and_differ_from_call_to_call():
    assert torch.equal(drawn_keep(7, (64, 64), 0.5), drawn_keep(7, (64, 64), 0.5))
    assert not torch.equal(drawn_keep(7, (64, 64), 0.5), drawn_keep(8, (64, 64), 0.5))
    torch.manual_seed(7)
    first, second = (MaskDrawer(CPU).keep(torch.empty(64, 64, dtype=torch.bool), 0.5) for _ in range(2))
    assert not torch.equal(first, second)


def test_a_mask_drawn_in_parts_is_the_mask_drawn_at_once():
    whole = drawn_keep(3, (5, 11), 0.4)
    torch.manual_seed(3)
    drawer, parts = MaskDrawer(CPU), torch.empty(5, 11, dtype=torch.bool)
    for rows in (slice(0, 1), slice(1, 4), slice(4, 5)):  # odd sizes: the generator's half-used words carry over
        drawer.keep(parts[rows], 0.4)
    assert torch.equal(parts, whole)


def test_dropout_keeps_one_byte_per_element_for_the_backward_pass():
    inputs = torch.randn(8, 64, 32, requires_grad=True)
    assert saved_bytes(lambda: Dropout(0.1)(inputs)) == inputs.numel()
    assert saved_bytes(lambda: nn.functional.dropout(inputs, 0.1)) >= 4 * inputs.numel()


def test_dropout_is_the_identity_where_nn_dropout_is():
    inputs = torch.randn(3, 5)
    assert Dropout(0.0)(inputs) is inputs
    assert Dropout(0.5).eval()(inputs) is inputs
    assert torch.equal(Dropout(1.0)(inputs), torch.zeros(3, 5))


def test_other_devices_draw_with_torch():
    inputs = torch.ones(2, 3, device="meta")
    assert Dropout(0.5)(inputs).device.type == "meta"
    assert MaskDrawer(inputs.device).keep(torch.empty(2, 3, dtype=torch.bool, device="meta"), 0.5).shape == (2, 3)


def test_prepared_models_use_it_everywhere_and_compute_the_same_in_eval(tiny_models):
    path = str(tiny_models["bert"])
    torch.manual_seed(0)
    base = load_base_model(path, revision=None, dtype="float32", trust_remote_code=False, pooling="model",
                           label_names=["a", "b"])
    rows = dict(load_tokenizer(path)(["a short one", "and a longer sentence"], padding=True, return_tensors="pt"))
    before = base.eval()(**rows).logits
    plain = sum(type(module) is nn.Dropout for module in base.modules())
    assert plain > 0
    prepare_frozen(base, load_tokenizer(path), pooling="model")
    assert not any(type(module) is nn.Dropout for module in base.modules())
    assert sum(type(module) is Dropout for module in base.modules()) == plain
    torch.testing.assert_close(base(**rows).logits, before)
    assert use_fast_dropout(base) == 0  # already swapped: preparing twice changes nothing
