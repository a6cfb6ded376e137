"""The method registry: one module per method in this package, found by name.

Adding a method means adding one file here whose options class is decorated with `@register`.
Method modules import torch only inside `build`, so that listing methods and validating recipes
stays fast.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from torch import nn

    from softprompt_cli.modeling import ModelSpec


class MethodOptions(BaseModel):
    """Options every method has. Subclasses add `name: Literal[...]` and their own options."""

    model_config = ConfigDict(extra="forbid")

    kind: ClassVar[Literal["input", "prefix"]]
    """`input`: the module returns virtual token embeddings [n, hidden] to insert into the input.
    `prefix`: it returns per-layer keys and values [layers, 2, kv_heads, n, head_dim]."""

    num_virtual_tokens: int = Field(20, ge=1, le=512, description="number of virtual tokens")

    def build(self, spec: ModelSpec) -> nn.Module:
        raise NotImplementedError


_REGISTRY: dict[str, type[MethodOptions]] = {}


def register(cls: type[MethodOptions]) -> type[MethodOptions]:
    name = cls.model_fields["name"].default
    _REGISTRY[name] = cls
    return cls


def registry() -> dict[str, type[MethodOptions]]:
    if not _REGISTRY:
        for module in pkgutil.iter_modules(__path__):
            if not module.name.startswith("_"):
                importlib.import_module(f"{__name__}.{module.name}")
    return dict(sorted(_REGISTRY.items()))
