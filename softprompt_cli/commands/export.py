"""`softprompt export`: a trained checkpoint as an adapter other tools load (PEFT)."""

from __future__ import annotations

from pathlib import Path

from softprompt_cli.artifacts.peft import write_peft_adapter
from softprompt_cli.assemble import model_from_trained, read_trained


def export_peft(checkpoint: Path, out: Path, model_path: str | None = None) -> tuple[Path, str | None]:
    """Write the adapter folder; return it and, where PEFT will refuse the adapter on this base model, what
    to do about it."""
    trained = read_trained(checkpoint, model_path)
    model, _ = model_from_trained(trained)
    return out, write_peft_adapter(out, str(checkpoint), trained.recipe, model, trained.labels)
