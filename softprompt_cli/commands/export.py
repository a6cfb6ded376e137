"""`softprompt export`: a trained checkpoint as an adapter other tools load (PEFT)."""

from __future__ import annotations

from pathlib import Path

from softprompt_cli.artifacts.peft import write_peft_adapter
from softprompt_cli.assemble import model_from_trained, read_trained
from softprompt_cli.config.schema import Recipe
from softprompt_cli.data.sources import input_fields


def token_type_note(recipe: Recipe, base) -> str | None:
    """PEFT's prompt learning drops token_type_ids: on a model with segment embeddings, pair inputs then differ."""
    pairs = any(len(input_fields(task.data, task.task)) == 2 for _, task in recipe.task_recipes()
                if task.task.type != "causal_lm")
    if not pairs or getattr(base.config, "type_vocab_size", 1) < 2:
        return None
    return ("note: PEFT ignores token_type_ids in prompt learning (its forward warns 'Token type ids are not "
            "supported'), so on sentence pairs this model's second text gets segment 0 there, not 1 as here: "
            "PEFT's logits for pairs differ slightly from ours (single texts are equal).")


def export_peft(checkpoint: Path, out: Path, model_path: str | None = None) -> tuple[Path, str | None]:
    """Write the adapter folder; return it and, where PEFT will refuse the adapter on this base model, what
    to do about it."""
    trained = read_trained(checkpoint, model_path)
    model, _ = model_from_trained(trained)
    refusal = write_peft_adapter(out, str(checkpoint), trained.recipe, model, trained.labels)
    notes = [note for note in (refusal, token_type_note(trained.recipe, model.base)) if note]
    return out, "\n".join(notes) or None
