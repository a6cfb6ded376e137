"""What every method is: options (pydantic) registered by name, and `build(spec)` giving a prompt module.

Adding a method means adding one file to this package whose options class is decorated with
`@register`. Method modules import torch only inside `build`, so that listing methods and validating
recipes stays fast.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import torch
    from torch import nn

    from softprompt_cli.methods._layers import Vocabulary

METHODS_PACKAGE = "softprompt_cli.methods"


@dataclass
class ModelSpec:
    """What a method needs to know about the base model to build its parameters."""

    hidden_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocabulary: Vocabulary
    """The input embeddings as the first layer receives them (scaled, in Gemma 3), to start prompts from."""
    tokenizer: Any
    fingerprint: str
    prefix_from_text: Callable[[str, int], torch.Tensor]
    """(text, n) -> the flat prefix [n, layers * 2 * kv_heads * head_dim] that the text leaves in the model."""
    prefix_from_checkpoint: Callable[[Path, int, int], torch.Tensor]
    """(folder, n, width) -> the flat prefix saved in a prefix-tuning checkpoint, checked against this model."""
    task_names: list[str]
    """The tasks the model is trained on (one for a single-task recipe)."""
    prompt_from_checkpoint: Callable[[Path], SourcePrompt]
    """folder -> the soft prompt saved in a checkpoint (ours or a PEFT adapter), checked against this model."""


@dataclass
class SourcePrompt:
    """A trained soft prompt read from a checkpoint, to start another from."""

    method: str
    tensors: dict[str, torch.Tensor]
    """The prompt module's tensors (without `prompt.`)."""
    task_names: list[str]


class MethodOptions(BaseModel):
    """Options every method has. Subclasses add `name: Literal[...]` and their own options."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    kind: ClassVar[Literal["input", "prefix"]]
    """`input`: the module returns virtual token embeddings [n, hidden] to insert into the input.
    `prefix`: it returns per-layer keys and values [layers, 2, kv_heads, n, head_dim]."""

    per_task: ClassVar[bool] = False
    """True: the module takes each row's task id and returns one prompt per row (`forward(task_ids)`)."""

    num_virtual_tokens: int = Field(20, ge=1, le=512, description="number of virtual tokens")

    def build(self, spec: ModelSpec) -> nn.Module:
        raise NotImplementedError

    def for_trained(self) -> MethodOptions:
        """These options for rebuilding a trained prompt, whose saved tensors replace its start: an init that reads
        no other checkpoint (one moved or deleted since must not stop a trained prompt from loading)."""
        return self


_REGISTRY: dict[str, type[MethodOptions]] = {}
_ALL_IMPORTED = False
"""Whether every method module has been imported: one imported directly (a test, `init_prefix`) registers
itself alone, so a non-empty registry is not yet a complete one."""


def register(cls: type[MethodOptions]) -> type[MethodOptions]:
    """Class decorator: make a method known by its `name`. A second class with the same name is a bug."""
    name = cls.model_fields["name"].default
    earlier = _REGISTRY.get(name)
    if earlier is not None and earlier.__qualname__ != cls.__qualname__:
        raise ValueError(f"method name {name!r} is registered twice: {earlier.__module__}.{earlier.__qualname__} "
                         f"and {cls.__module__}.{cls.__qualname__}. Give the new method another name.")
    _REGISTRY[name] = cls
    return cls


def registry() -> dict[str, type[MethodOptions]]:
    """Every method, by name; the method modules are imported on first use."""
    global _ALL_IMPORTED
    if not _ALL_IMPORTED:
        package = importlib.import_module(METHODS_PACKAGE)
        for module in pkgutil.iter_modules(package.__path__):
            if not module.name.startswith("_") and module.name != "base":
                importlib.import_module(f"{METHODS_PACKAGE}.{module.name}")
        _ALL_IMPORTED = True
    return dict(sorted(_REGISTRY.items()))
