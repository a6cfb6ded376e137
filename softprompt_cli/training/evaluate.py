"""Evaluation inside and outside training: the recipe's metrics, gathered over processes."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from softprompt_cli import metrics
from softprompt_cli.config.schema import Recipe


@torch.no_grad()
def evaluate(model, eval_loader, accelerator: Accelerator, recipe: Recipe, label_names: list[str], tokenizer,
             targets: list[str] | None, with_prompt: bool = True) -> dict:
    """The recipe's metrics on the eval loader, gathered over processes: predicted labels (a head's argmax,
    or the most likely label word), or generated texts against `targets` (exact match)."""
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.eval()
    predictions, references = [], []
    for batch in eval_loader:
        if "target_index" in batch:
            generated = unwrapped.generate(batch["input_ids"], batch["attention_mask"], recipe.task.max_new_tokens,
                                           tokenizer.eos_token_id, with_prompt=with_prompt)
            texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
            pairs = accelerator.gather_for_metrics(
                [(text, targets[i]) for text, i in zip(texts, batch["target_index"].tolist())])
            predictions += [text for text, _ in pairs]
            references += [target for _, target in pairs]
            continue
        labels = batch.pop("labels")
        scores = unwrapped.scores(**batch, with_prompt=with_prompt)
        gathered = accelerator.gather_for_metrics((scores.argmax(-1), labels))
        predictions += gathered[0].tolist()
        references += gathered[1].tolist()
    unwrapped.train()
    return metrics.compute(recipe.metrics, predictions, references, len(label_names),
                           recipe.task.positive_index(label_names))
