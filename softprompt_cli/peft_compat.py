"""Letting PEFT's prefix tuning run on transformers 5 models whose forward calls the cache `cache`.

PEFT (0.21.2 and earlier) applies a prefix-tuning adapter to a sequence classifier only if the model's
forward (or its backbone's) names a `past_key_values` parameter. transformers 5 renamed that parameter
to `cache` (BERT, GPT-2, ...), so PEFT refuses with "Model does not support past key values". The
prefix itself still works: it is a `DynamicCache` that the attention layers extend. `expose_past_key_values`
gives the model a forward that names the old parameter and hands it on as `cache`.

    from softprompt_cli.peft_compat import expose_past_key_values
    model = PeftModel.from_pretrained(expose_past_key_values(base), "adapter")

Imports neither torch nor transformers.
"""

from __future__ import annotations

import inspect
from typing import Any

PEFT_CACHE_ARGUMENT = "past_key_values"


def names_past_key_values(model: Any) -> bool:
    """Whether PEFT's prefix-tuning check finds `past_key_values` in the forward of the model or its backbone."""
    backbone = getattr(model, "base_model", model)
    return any(PEFT_CACHE_ARGUMENT in inspect.signature(m.forward).parameters for m in (model, backbone))


def expose_past_key_values(model: Any) -> Any:
    """The same model, whose forward also takes `past_key_values` and passes it on as `cache`.

    Changes only this model object's `forward` attribute (not its class); a model that already names
    `past_key_values` is returned as it is.
    """
    if names_past_key_values(model):
        return model
    original = model.forward

    def forward(*args: Any, past_key_values: Any = None, **kwargs: Any) -> Any:
        if past_key_values is not None:
            kwargs["cache"] = past_key_values
        return original(*args, **kwargs)

    signature = inspect.signature(original)
    old_name = inspect.Parameter(PEFT_CACHE_ARGUMENT, inspect.Parameter.KEYWORD_ONLY, default=None)
    parameters = [p for p in signature.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    variadic = [p for p in signature.parameters.values() if p.kind == inspect.Parameter.VAR_KEYWORD]
    forward.__signature__ = signature.replace(parameters=[*parameters, old_name, *variadic])  # type: ignore[attr-defined]
    forward.__doc__ = original.__doc__
    model.forward = forward
    return model


def peft_refusal_note(model: Any, peft_type: str, task_type: str) -> str | None:
    """What to tell the user whose adapter PEFT will refuse to apply to this base model, or None."""
    if peft_type != "PREFIX_TUNING" or task_type != "SEQ_CLS" or names_past_key_values(model):
        return None
    return (f"note: PEFT (0.21.2 and earlier) refuses prefix-tuning SEQ_CLS adapters on {type(model).__name__} with "
            "this transformers, whose forward names the cache `cache`, not `past_key_values` (\"Model does not "
            "support past key values\"). Load it with PeftModel.from_pretrained(expose_past_key_values(base), "
            "ADAPTER), where expose_past_key_values comes from softprompt_cli.peft_compat; the logits are then "
            "the same as here.")
