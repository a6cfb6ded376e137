"""Dropout whose masks cost a third of PyTorch's on CPU.

PyTorch draws CPU dropout masks from its Mersenne Twister one element at a time (`bernoulli_`, ~8 ns per
element on this project's 2-core machine); in a MiniLM training step that was 15% of the time, more than the
attention. NumPy's PCG64 fills float32 uniforms about 3x faster. The masks here are `uniform >= p` over
float32 uniforms on the 2^-24 grid, the resolution of `torch.rand`, from a PCG64 generator seeded by one draw
from torch's default generator: they follow `torch.manual_seed`, and a resumed run, which restores torch's
random state, draws the same ones. Other devices keep PyTorch's own generator (fast there).

The frozen model's `nn.Dropout` modules are swapped for `Dropout` when it is prepared (`use_fast_dropout`),
and the attention dropout (`attention.DropoutAttention`) draws through `MaskDrawer`: the dropouts of the
frozen model in every model family this project runs (BERT, GPT-2, ...), for every method. Models that call
`nn.functional.dropout` themselves or use a dropout subclass keep PyTorch's masks, as do the soft prompts' own
few dropouts, on a handful of rows.

The kept values are scaled by 1 / (1 - p) in the input's dtype from the exact float (PyTorch rounds the
factor to the dtype first: in bfloat16, 1.109 instead of 1.111 for p = 0.1). `inplace=True` is accepted and
not honoured: the result is a new tensor, which is all the frozen models use.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class MaskDrawer:
    """Keep-masks (True with probability 1 - p) for one call of a layer, drawn one after another from one
    stream: masks drawn in parts are the mask drawn at once."""

    def __init__(self, device: torch.device):
        self._numpy = None
        if device.type == "cpu":
            seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
            self._numpy = np.random.Generator(np.random.PCG64(seed))

    def keep(self, out: torch.Tensor, p: float) -> torch.Tensor:
        """Fill the boolean tensor `out` with a keep-mask for dropout probability `p`."""
        if self._numpy is None:
            return out.bernoulli_(1 - p)
        uniform = np.empty(out.shape, dtype=np.float32)
        self._numpy.random(dtype=np.float32, out=uniform)
        return torch.ge(torch.from_numpy(uniform), p, out=out)


class MaskedScale(torch.autograd.Function):
    """x · keep / (1 - p), with the keep-mask (one byte per element) saved for the backward pass."""

    @staticmethod
    def forward(ctx, inputs: torch.Tensor, p: float):
        keep = MaskDrawer(inputs.device).keep(torch.empty(inputs.shape, dtype=torch.bool), p)
        ctx.save_for_backward(keep)
        ctx.scale = 1 / (1 - p)
        return torch.where(keep, inputs, 0).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad_output):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad_output, 0).mul_(ctx.scale), None


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
