"""Resumable training state, without pickle: tensors in safetensors, everything else in JSON.

    <output>/state/params.safetensors     trainable parameters in their training form (P-tuning's
                                          encoder, the prefix projection MLP, not only their output)
    <output>/state/optimizer.safetensors  optimizer tensors (AdamW moments, step counts)
    <output>/state/rng.safetensors        torch RNG state of every process
    <output>/state/state.json             optimizer and scheduler settings, Python/NumPy RNG states,
                                          step, epoch, batches consumed in the epoch, best metric
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from softprompt_cli.artifacts.checkpoint import atomic_folder, recover_folder, refuse_non_finite
from softprompt_cli.config.schema import Recipe
from softprompt_cli.errors import UserError

# Settings that may change when a run is resumed; anything else must match the interrupted run. Autocast changes
# no saved tensor (parameters and AdamW moments stay float32), so mixed_precision may change: `auto` resolves to
# what the machine that resumes computes natively.
RESUMABLE_CHANGES = {("training", "epochs"), ("training", "max_steps"), ("training", "save_state_steps"),
                     ("training", "log_steps"), ("training", "eval_steps"), ("training", "mixed_precision"),
                     ("output", "overwrite")}

STATE_FILE = "state.json"


def capture_rng() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))


def _split_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, plain = {}, {}
    for index, values in state_dict["state"].items():
        plain[str(index)] = {}
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value
            else:
                plain[str(index)][key] = value
    return tensors, {"state": plain, "param_groups": state_dict["param_groups"]}


def _join_optimizer(tensors: dict[str, torch.Tensor], plain: dict) -> dict:
    state: dict[int, dict] = {int(i): dict(values) for i, values in plain["state"].items()}
    for name, tensor in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    return {"state": state, "param_groups": plain["param_groups"]}


def save_state(directory: Path, params: dict[str, torch.Tensor], optimizer, scheduler,
               rng_per_process: list[dict[str, Any]], progress: dict[str, Any]) -> None:
    refuse_non_finite(directory, params)
    optimizer_tensors, optimizer_plain = _split_optimizer(optimizer.state_dict())
    with atomic_folder(directory) as staging:
        save_file({k: v.detach().cpu().contiguous() for k, v in params.items()}, staging / "params.safetensors")
        save_file({k: v.cpu().contiguous() for k, v in optimizer_tensors.items()}, staging / "optimizer.safetensors")
        save_file({f"torch.{rank}": rng["torch"] for rank, rng in enumerate(rng_per_process)},
                  staging / "rng.safetensors")
        info = {
            "progress": progress,
            "optimizer": optimizer_plain,
            "scheduler": scheduler.state_dict(),
            "rng": [{k: v for k, v in rng.items() if k != "torch"} for rng in rng_per_process],
        }
        (staging / STATE_FILE).write_text(json.dumps(info) + "\n")


def load_state(directory: Path, recover: bool = True) -> dict[str, Any]:
    """The state saved in `directory`. With `recover` (one process only), first finish or undo a replacement of
    the folder that a crash interrupted (see recover_folder), which would otherwise leave no state to read."""
    if recover:
        recover_folder(directory)
    if not (directory / STATE_FILE).is_file():
        raise UserError(f"no training state in {str(directory)!r} to resume from. A run saves one at the end of "
                        "every epoch and on Ctrl-C; give the run's state folder (<output.dir>/state).")
    try:
        return _read_state(directory)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as err:
        # JSON, missing keys, truncated or missing tensor files: the folder cannot be resumed from
        raise UserError(f"the training state in {str(directory)!r} is damaged ({type(err).__name__}: {err}). "
                        "Start the run again without --resume (output.overwrite=true), or resume from a copy "
                        "of an intact state folder.") from None


def _read_state(directory: Path) -> dict[str, Any]:
    info = json.loads((directory / STATE_FILE).read_text())
    torch_rng = load_file(directory / "rng.safetensors")
    rng = [{**plain, "torch": torch_rng[f"torch.{rank}"]} for rank, plain in enumerate(info["rng"])]
    return {
        "params": load_file(directory / "params.safetensors"),
        "optimizer": _join_optimizer(load_file(directory / "optimizer.safetensors"), info["optimizer"]),
        "scheduler": info["scheduler"],
        "rng": rng,
        "progress": info["progress"],
    }


def with_saved_batching(recipe: Recipe, saved: dict) -> Recipe:
    """A resumed run's recipe: where it leaves training.group_by_length to `auto`, the saved run's decision (the
    rest of an interrupted epoch must be the batches it would have drawn, whatever device it resumes on; a run saved
    before `auto` existed holds the old default, true)."""
    decided = saved.get("training", {}).get("group_by_length")
    if recipe.training.group_by_length != "auto" or not isinstance(decided, bool):
        return recipe
    return with_group_by_length(recipe, decided)


def with_group_by_length(recipe: Recipe, grouped: bool) -> Recipe:
    """`recipe` with training.group_by_length decided (a copy: the caller's recipe stays as it was)."""
    return recipe.model_copy(update={"training": recipe.training.model_copy(update={"group_by_length": grouped})})


def check_resumable(saved: dict, recipe: Recipe, directory: Path) -> None:
    current = with_saved_batching(recipe, saved).model_dump(mode="json")
    changed = [f"{section}.{key}" for section, values in current.items() if isinstance(values, dict)
               for key, value in values.items()
               if (section, key) not in RESUMABLE_CHANGES and saved.get(section, {}).get(key) != value]
    if changed:
        raise UserError(f"the recipe differs from the one of the run saved in {str(directory)!r} "
                        f"({', '.join(changed)}). Resume with the same recipe (epochs and max_steps may change).")
