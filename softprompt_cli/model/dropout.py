"""Dropout whose masks cost a quarter of PyTorch's on CPU.

PyTorch draws CPU dropout masks from its Mersenne Twister one element at a time (`bernoulli_`, 8 to 11 ns per
element on this project's 2-core machines); in a MiniLM training step that was 15% of the time, more than the
attention. Here each element takes 32 raw bits from NumPy's PCG64 (`random_raw`, its fastest path: about 2 ns
per element) and is kept where those bits, read as an unsigned integer, are at least round(p · 2^32): keep
probability 1 - p on a 2^-32 grid (`torch.rand` has 2^-24). The bits are compared as signed int32, shifted by
2^31, so that PyTorch compares them on both threads. The generator is seeded by one draw from torch's default
generator: masks follow `torch.manual_seed`, and a resumed run, which restores torch's random state, draws the
same ones. Other devices keep PyTorch's own generator (fast there).

The frozen model's `nn.Dropout` modules are swapped for `Dropout` when it is prepared (`use_fast_dropout`),
and the attention dropout (`attention.DropoutAttention`) draws through `MaskDrawer`: the dropouts of the
frozen model in every model family this project runs (BERT, GPT-2, ...), for every method. Models that call
`nn.functional.dropout` themselves or use a dropout subclass keep PyTorch's masks, as do the soft prompts' own
few dropouts, on a handful of rows.

Masks are applied by multiplying with the mask's bytes read as uint8 (`kept`), which PyTorch's CPU kernels do
about four times faster than `torch.where` on a bool mask. The kept values are scaled by 1 / (1 - p) in the
input's dtype from the exact float (PyTorch rounds the factor to the dtype first: in bfloat16, 1.109 instead of
1.111 for p = 0.1). `inplace=True` is accepted and not honoured: the result is a new tensor, which is all the
frozen models use.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class MaskDrawer:
    """Keep-masks (True with probability 1 - p) for one call of a layer, drawn one after another from one
    stream: masks drawn in parts are the mask drawn at once."""

    def __init__(self, device: torch.device):
        self._bit_generator = None
        self._spare_bits = np.empty(0, dtype=np.int32)  # the unused half of the last 64-bit word
        if device.type == "cpu":
            seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
            self._bit_generator = np.random.PCG64(seed)

    def keep(self, out: torch.Tensor, p: float) -> torch.Tensor:
        """Fill the boolean tensor `out` with a keep-mask for dropout probability `p`."""
        if self._bit_generator is None:
            return out.bernoulli_(1 - p)
        bits = torch.from_numpy(self._bits(out.numel())).view(out.shape)
        return torch.ge(bits, signed_threshold(p), out=out)

    def _bits(self, count: int) -> np.ndarray:
        words = self._bit_generator.random_raw((count - len(self._spare_bits) + 1) // 2)
        bits = words.view(np.int32)
        if len(self._spare_bits):
            bits = np.concatenate([self._spare_bits, bits])
        self._spare_bits = bits[count:]
        return bits[:count]


def signed_threshold(p: float) -> int:
    """Uniform int32 bits at or above this are kept with probability 1 - p (to 2^-32): the unsigned threshold
    round(p · 2^32), shifted by 2^31 as the bits are when read as signed."""
    return min(round(p * 2**32), 2**32 - 1) - 2**31


def kept(keep: torch.Tensor) -> torch.Tensor:
    """A bool mask as the uint8 tensor to multiply by (the same bytes, no copy)."""
    return keep.view(torch.uint8)


class MaskedScale(torch.autograd.Function):
    """x · keep / (1 - p), with the keep-mask (one byte per element) saved for the backward pass."""

    @staticmethod
    def forward(ctx, inputs: torch.Tensor, p: float):
        keep = MaskDrawer(inputs.device).keep(torch.empty(inputs.shape, dtype=torch.bool), p)
        ctx.save_for_backward(keep)
        ctx.scale = 1 / (1 - p)
        return torch.mul(inputs, kept(keep)).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad_output):
        (keep,) = ctx.saved_tensors
        return torch.mul(grad_output, kept(keep)).mul_(ctx.scale), None


class Dropout(nn.Dropout):
    """`nn.Dropout` (same arguments, same function in float32 and float64) with `MaskDrawer`'s masks on CPU."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return inputs
        if inputs.device.type != "cpu" or self.p >= 1:
            return super().forward(inputs)
        return MaskedScale.apply(inputs, self.p)


def use_fast_dropout(model: nn.Module) -> int:
    """Swap every `nn.Dropout` of `model` (exactly that class, not subclasses) for `Dropout`; the count swapped."""
    swapped = 0
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Dropout:
                replacement = Dropout(child.p, child.inplace)
                replacement.train(child.training)
                setattr(parent, name, replacement)
                swapped += 1
    return swapped
