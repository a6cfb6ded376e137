"""Mixed precision: what `training.mixed_precision: auto` runs on this machine, and the autocast a checkpoint's
predictions run under.

Precisions are named as the recipe names them: `no` (float32), `bf16`, `fp16`. bf16 autocast pays only where the
hardware computes bf16: elsewhere (a CPU without AVX512-BF16 or AMX, a GPU before Ampere) each bf16 matmul is
emulated, and training got slower, not faster (README, Mixed precision). Autocast changes no stored tensor: the
frozen model, the prompt and the optimizer stay float32.
"""

from __future__ import annotations

import contextlib

import torch

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
OPTION_PRECISIONS = {"fp32": "no", "bf16": "bf16"}
"""`--precision` of eval and predict (besides `checkpoint`) -> the precision it runs."""


def computes_bf16_natively(device: torch.device) -> bool:
    """Whether the device has bf16 arithmetic in hardware (not emulated in float32)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)  # Ampere and newer (tensor-core bf16)
    if device.type == "cpu":
        # Private but stable (torch >= 2.3) views of cpuinfo's flags; oneDNN's own bf16 check also says yes
        # for plain AVX-512, where bf16 is emulated.
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False  # MPS, XPU, ...: not measured, so float32


def resolve(setting: str, device: torch.device) -> str:
    """A recipe's `training.mixed_precision` as it runs on `device`: `auto` becomes bf16 where the device computes
    bf16 natively, else no; the other settings stay as they are."""
    if setting != "auto":
        return setting
    return "bf16" if computes_bf16_natively(device) else "no"


def for_inference(option: str, trained: str, device: torch.device) -> str:
    """The precision predictions run in: the checkpoint's training precision (`option` checkpoint), or the one
    `option` names (fp32, bf16)."""
    return resolve(trained, device) if option == "checkpoint" else OPTION_PRECISIONS[option]


def emulation_note(option: str, ran: str, device: torch.device) -> str | None:
    """A note for whoever runs a bf16 checkpoint as it trained (`option` checkpoint) on a device that emulates bf16,
    which is many times slower than float32 there (README, Mixed precision); None where there is nothing to say."""
    if option != "checkpoint" or ran != "bf16" or computes_bf16_natively(device):
        return None
    return (f"the checkpoint trained in bf16, so it runs in bf16 here, but this {device.type} has no bf16 arithmetic "
            "(it is emulated, many times slower than float32): --precision fp32 runs it faster, with results that "
            "differ by bf16's rounding only.")


def display_name(precision: str) -> str:
    """What logs and reports call a precision: fp32 for no."""
    return "fp32" if precision == "no" else precision


def autocast(precision: str, device_type: str) -> contextlib.AbstractContextManager:
    """The autocast of `precision` on a device type (cpu, cuda); float32 runs without one."""
    if precision not in AUTOCAST_DTYPES:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=AUTOCAST_DTYPES[precision])
