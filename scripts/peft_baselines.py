"""Hugging Face PEFT's side of scripts/bench_vs_peft.py: the model, batches and loop a PEFT user writes.

Sequence classification (SEQ_CLS) follows PEFT's example examples/sequence_classification/
peft_no_lora_accelerate.py: shuffled batches padded to their longest row, the model's own loss. Causal LM
(CAUSAL_LM) is a plain PyTorch loop: shuffled batches padded on the left, so that every row ends with its label
word, and the loss on that word alone. By default only its prediction goes through the LM head, as in softprompt
(`logits_to_keep`); `full_logits` (the bench's `--peft-loss labels`) instead passes `labels` to the model, as
PEFT's causal-LM examples do, which computes logits at every position and the loss where labels are not -100.
Both sides read the bench's recipe, so PEFT trains on softprompt's tokenization of the same examples with the
same optimizer settings: AdamW (learning rate, weight decay), the linear warmup schedule and gradient clipping.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
)

from softprompt_cli.config.schema import Recipe
from softprompt_cli.data.batching import TokenizedRows, label_word_ids, task_rows
from softprompt_cli.data.tasks import TaskData
from softprompt_cli.data.templates import label_word_list
from softprompt_cli.hub import resolve_model_reference
from softprompt_cli.model.loading import load_tokenizer
from softprompt_cli.peft_compat import expose_past_key_values

# Positions kept for the LM head, as index tensors: an integer `logits_to_keep` slices the hidden states, and
# PyTorch multiplies that strided [batch, n, hidden] slice by the 49k-row head through a batched product that
# copies the head's weight once per row (SmolLM2, batch 16: 127 ms against 28 ms forward, 271 against 47 ms with
# the backward pass). Indexing copies the rows out first, so the product is one matrix multiply.
PREDICTS_LABEL_WORD = torch.tensor([-2])
"""The position before the label word (the last one), which predicts it."""
PREDICTS_NEXT_WORD = torch.tensor([-1])
PEFT_CONFIG_CLASSES = {"prompt_tuning": "PromptTuningConfig", "p_tuning": "PromptEncoderConfig",
                       "prefix_tuning": "PrefixTuningConfig"}


@dataclass
class PeftRun:
    """PEFT's model with everything its training loop uses."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loader: DataLoader
    eval_loader: DataLoader
    max_grad_norm: float | None
    word_ids: list[int] | None
    """causal LM: each label's one-token label word, in label order; None: sequence classification."""
    pass_positions: bool
    """Whether the batches' position ids go to PEFT: it shifts them past a prefix, and drops them (with a
    warning) for prompt tuning and P-tuning."""
    full_logits: bool = False
    """causal LM: the model's own loss from `labels` (logits at every position), not the label word's alone."""


def model_location(recipe: Recipe) -> str:
    location, _ = resolve_model_reference(recipe.model.name_or_path, recipe.model.revision, recipe.model.gguf_file)
    return location


def plain_tokenizer(recipe: Recipe):
    """The recipe's tokenizer, padding as softprompt pads for the task: decoders on the left, so that the label
    word is every row's last token."""
    spec = recipe.model
    tokenizer = load_tokenizer(spec.name_or_path, spec.revision, gguf_file=spec.gguf_file)
    tokenizer.padding_side = "left" if recipe.task.type == "causal_lm" else "right"
    return tokenizer


def plain_model(recipe: Recipe, num_labels: int) -> torch.nn.Module:
    """transformers' own model class with its default attention, loaded as a PEFT user loads it."""
    options = {"gguf_file": recipe.model.gguf_file} if recipe.model.gguf_file else {}
    if recipe.task.type == "causal_lm":
        return AutoModelForCausalLM.from_pretrained(model_location(recipe), **options)
    return AutoModelForSequenceClassification.from_pretrained(model_location(recipe), num_labels=num_labels,
                                                              **options)


def one_token_label_words(recipe: Recipe, tokenizer, label_names: list[str]) -> list[int] | None:
    if recipe.task.type != "causal_lm":
        return None
    ids = label_word_ids(tokenizer, label_word_list(recipe.task.label_words, label_names), label_names)
    if any(len(word) != 1 for word in ids):
        raise SystemExit(f"the causal-LM bench scores label words of one token each; these are {ids}")
    return [word[0] for word in ids]


def plain_loader(rows: TokenizedRows, tokenizer, batch_size: int, shuffle_seed: int | None) -> DataLoader:
    """Batches in the rows' order (or shuffled, reshuffled every epoch), each padded to its longest row."""
    rows = rows.without("length")
    token_labels = isinstance(rows[0]["labels"], list)  # causal-LM training rows: -100 except on the label word
    collate = (DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100) if token_labels
               else DataCollatorWithPadding(tokenizer))
    generator = None if shuffle_seed is None else torch.Generator().manual_seed(shuffle_seed)
    return DataLoader(rows, batch_size=batch_size, shuffle=shuffle_seed is not None, generator=generator,
                      collate_fn=collate)


def peft_config(recipe: Recipe, method: str, options: dict):
    # Imported here, not at the top: every worker of the bench imports this module, and softprompt's peak
    # memory must not include what only PEFT's side imports.
    import peft

    options = dict(options)
    if options.get("prompt_tuning_init") == "TEXT":  # PEFT loads the tokenizer itself to embed the text
        options |= {"tokenizer_name_or_path": model_location(recipe),
                    "tokenizer_kwargs": {"gguf_file": recipe.model.gguf_file} if recipe.model.gguf_file else {}}
    task_type = "CAUSAL_LM" if recipe.task.type == "causal_lm" else "SEQ_CLS"
    config_class = getattr(peft, PEFT_CONFIG_CLASSES[method])
    return config_class(task_type=task_type, num_virtual_tokens=recipe.method.num_virtual_tokens, **options)


def build_peft_run(recipe: Recipe, tasks: list[TaskData], options: dict, full_logits: bool = False) -> PeftRun:
    """PEFT's model for the recipe's method (`options`: extra PEFT config fields), its optimizer, schedule and
    loaders, on the recipe's examples and training settings (`full_logits`: see PeftRun)."""
    import peft  # here, not at the top: see peft_config
    from transformers import get_linear_schedule_with_warmup

    cfg, method = recipe.training, recipe.method.name
    torch.manual_seed(cfg.seed)
    tokenizer, label_names = plain_tokenizer(recipe), tasks[0].label_names
    base = plain_model(recipe, len(label_names))
    if method == "prefix_tuning":  # PEFT 0.21.2 hands the prefix to `past_key_values`; transformers 5 says `cache`
        base = expose_past_key_values(base)
    model = peft.get_peft_model(base, peft_config(recipe, method, options))
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
    train_loader = plain_loader(task_rows(recipe, tasks, tokenizer, training=True), tokenizer, cfg.batch_size,
                                cfg.seed)
    eval_loader = plain_loader(task_rows(recipe, tasks, tokenizer, training=False), tokenizer,
                               cfg.eval_batch_size, None)
    total = len(train_loader) * cfg.epochs
    # softprompt's rounding of the warmup, so that both schedules are the same step for step
    scheduler = get_linear_schedule_with_warmup(optimizer, round(cfg.warmup_ratio * total), total)
    word_ids = one_token_label_words(recipe, tokenizer, label_names)
    return PeftRun(model, optimizer, scheduler, train_loader, eval_loader, cfg.max_grad_norm, word_ids,
                   pass_positions=word_ids is not None and method == "prefix_tuning", full_logits=full_logits)


def lm_inputs(run: PeftRun, batch: dict) -> dict:
    # No KV cache: transformers would otherwise build one in every forward (a prefix still arrives as one).
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    if run.pass_positions:  # left padding: each row's real tokens count from 0, as softprompt places them
        inputs["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return inputs


def peft_loss(run: PeftRun, batch: dict) -> torch.Tensor:
    if run.word_ids is None:
        return run.model(**batch).loss
    if run.full_logits:
        return run.model(**lm_inputs(run, batch), labels=batch["labels"]).loss
    logits = run.model(**lm_inputs(run, batch), logits_to_keep=PREDICTS_LABEL_WORD).logits[:, 0]
    return F.cross_entropy(logits.float(), batch["labels"][:, -1])


def peft_train_step(run: PeftRun, batch: dict) -> float:
    """Forward, backward, clipping and the optimizer step; returns the loss."""
    loss = peft_loss(run, batch)
    loss.backward()
    if run.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(run.optimizer.param_groups[0]["params"], run.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad()
    return loss.item()


def peft_epoch(run: PeftRun) -> dict:
    """One training epoch: its mean loss, seconds, and the rows and tokens it fed (real and with padding)."""
    run.model.train()
    losses, real, padded, examples = [], 0, 0, 0
    start = time.perf_counter()
    for batch in run.train_loader:
        losses.append(peft_train_step(run, batch))
        real += int(batch["attention_mask"].sum())
        padded += batch["attention_mask"].numel()
        examples += len(batch["input_ids"])
    return {"seconds": time.perf_counter() - start, "loss": sum(losses) / len(losses), "real_tokens": real,
            "padded_tokens": padded, "examples": examples}


@torch.no_grad()
def peft_scores(run: PeftRun, batch: dict) -> torch.Tensor:
    """One score per label: the classifier's logits, or each label word's logit after the input."""
    if run.word_ids is None:
        return run.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return run.model(**lm_inputs(run, batch), logits_to_keep=PREDICTS_NEXT_WORD).logits[:, -1, run.word_ids]


def peft_evaluation(run: PeftRun) -> dict:
    """Dev accuracy, rows and seconds."""
    run.model.eval()
    correct = rows = 0
    start = time.perf_counter()
    for batch in run.eval_loader:
        correct += int((peft_scores(run, batch).argmax(-1) == batch["labels"]).sum())
        rows += len(batch["labels"])
    return {"accuracy": correct / rows, "rows": rows, "seconds": time.perf_counter() - start}
