"""Where predict and serve run the frozen model (training and eval place it through Accelerate)."""

from __future__ import annotations

import torch

from softprompt_cli.errors import UserError


def inference_device(option: str) -> torch.device:
    """--device: auto (the first GPU when torch sees one, else the CPU), cpu, cuda or cuda:N. The option's form
    was checked before torch was imported (commands.arguments.check_device_option)."""
    if option == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(option)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            seen = f"it sees {count} GPU(s)" if count else "it sees no GPU (a CPU-only torch, or no driver)"
            raise UserError(f"--device {option}: torch cannot use that GPU; {seen}. Give --device cpu, or auto to "
                            "use a GPU when there is one.")
    return device
