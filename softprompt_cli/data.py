"""Tokenize once, pad per batch, and order examples so that batches hold similar lengths."""

from __future__ import annotations

import datasets
import torch
from datasets import Dataset
from torch.utils.data import DataLoader, Sampler
from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

from softprompt_cli.errors import UserError
from softprompt_cli.sources import Examples

datasets.disable_progress_bars()  # tokenizing takes a second; the training bar is the one that matters


def tokenize(examples: Examples, tokenizer, max_length: int, separate_pair: bool = False) -> Dataset:
    """Token ids per example; with `separate_pair`, each text of a pair as its own sequence (`*_b` columns)."""
    pair = len(examples.texts[0]) == 2
    columns = {"text": [t[0] for t in examples.texts], "labels": examples.labels}
    if pair:
        columns["text_pair"] = [t[1] for t in examples.texts]

    def encode(batch):
        if not separate_pair:
            return tokenizer(batch["text"], batch["text_pair"] if pair else None, truncation=True,
                             max_length=max_length)
        first = tokenizer(batch["text"], truncation=True, max_length=max_length)
        second = tokenizer(batch["text_pair"], truncation=True, max_length=max_length)
        return {**first, **{f"{k}_b": v for k, v in second.items()}}

    dataset = Dataset.from_dict(columns)
    dataset = dataset.map(encode, batched=True, remove_columns=[c for c in columns if c != "labels"])
    return dataset.map(lambda row: {"length": max(len(row["input_ids"]), len(row.get("input_ids_b") or []))})


def tokenize_causal(examples: Examples, tokenizer, max_length: int, training: bool, free_form: bool) -> Dataset:
    """causal_lm rows. Training: input + target tokens, `labels` -100 except on the target (plus EOS for free-form
    targets, so that the model learns to stop). Evaluation: the input alone, with the label id or, for free-form
    targets, `target_index` (the row's index in examples.targets). Inputs longer than max_length keep their end,
    where the template puts its cue ("Sentiment:")."""
    inputs = tokenizer([text for text, in examples.texts])["input_ids"]
    columns: dict[str, list] = {"input_ids": [], "labels": []} if training or not free_form else {
        "input_ids": [], "target_index": list(range(len(inputs)))}
    if training:
        targets = tokenizer(examples.targets, add_special_tokens=False)["input_ids"]
        for ids, target in zip(inputs, targets):
            target = (target + [tokenizer.eos_token_id] if free_form else target)[:max_length - 1]
            ids = ids[len(ids) - (max_length - len(target)):] if len(ids) + len(target) > max_length else ids
            columns["input_ids"].append(ids + target)
            columns["labels"].append([-100] * len(ids) + target)
    else:
        columns["input_ids"] = [ids[-max_length:] for ids in inputs]
        if not free_form:
            columns["labels"] = list(examples.labels)
    columns["attention_mask"] = [[1] * len(ids) for ids in columns["input_ids"]]
    columns["length"] = [len(ids) for ids in columns["input_ids"]]
    return Dataset.from_dict(columns)


def label_word_ids(tokenizer, words: list[str], label_names: list[str]) -> list[list[int]]:
    """Token ids of each label word, as they follow the input (no special tokens)."""
    ids = [tokenizer(word, add_special_tokens=False)["input_ids"] for word in words]
    empty = [f"{name}: {word!r}" for name, word, word_ids in zip(label_names, words, ids) if not word_ids]
    if empty:
        raise UserError(f"task.label_words {', '.join(empty)} tokenize to nothing with this model's tokenizer. "
                        "Give each label a real word (e.g. ' positive').")
    if len({tuple(i) for i in ids}) != len(ids):
        raise UserError(f"task.label_words {words} tokenize to the same tokens for two labels ({ids}). Give each "
                        "label a distinct word.")
    return ids


class SeparatePairCollator:
    """Pads a batch of B pairs into 2B sequences: all first texts, then all second texts."""

    def __init__(self, tokenizer):
        self.pad = DataCollatorWithPadding(tokenizer)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        first = [{k: v for k, v in row.items() if k != "labels" and not k.endswith("_b")} for row in rows]
        second = [{k[:-2]: v for k, v in row.items() if k.endswith("_b")} for row in rows]
        batch = self.pad(first + second)
        batch["labels"] = torch.tensor([row["labels"] for row in rows])
        return batch


class LengthGroupedSampler(Sampler[int]):
    """Yields indices so that each run of `batch_size` indices is a batch of similar lengths.

    Shuffled: examples are shuffled, cut into buckets of `batch_size * bucket_batches`, sorted by
    length inside each bucket, cut into batches, and the batches are shuffled. Not shuffled:
    longest first (evaluation: order does not matter, padding does). `set_epoch` reseeds, as
    for torch's DistributedSampler, so every process draws the same order.
    """

    def __init__(self, lengths: list[int], batch_size: int, shuffle: bool, group: bool, seed: int = 0,
                 bucket_batches: int = 50):
        self.lengths = lengths
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.group = group
        self.seed = seed
        self.bucket_batches = bucket_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        n = len(self.lengths)
        if not self.shuffle:
            order = sorted(range(n), key=lambda i: -self.lengths[i]) if self.group else list(range(n))
            yield from order
            return
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(n, generator=generator).tolist()
        if not self.group:
            yield from order
            return
        bucket = self.batch_size * self.bucket_batches
        batches = []
        for start in range(0, n, bucket):
            chunk = sorted(order[start:start + bucket], key=lambda i: -self.lengths[i])
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        # Keep one short batch (if any) last, so that every other batch is full.
        full = [b for b in batches if len(b) == self.batch_size]
        short = [b for b in batches if len(b) < self.batch_size]
        for i in torch.randperm(len(full), generator=generator).tolist():
            yield from full[i]
        for batch in short:
            yield from batch


def loader(dataset: Dataset, tokenizer, batch_size: int, shuffle: bool, group_by_length: bool,
           seed: int = 0) -> DataLoader:
    sampler = LengthGroupedSampler(dataset["length"], batch_size, shuffle, group_by_length, seed)
    if "input_ids_b" in dataset.column_names:
        collate = SeparatePairCollator(tokenizer)
    elif "labels" in dataset.column_names and isinstance(dataset[0]["labels"], list):  # causal_lm token targets
        collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
    else:
        collate = DataCollatorWithPadding(tokenizer)
    # Its own generator: creating an iterator then never draws from the global RNG, whose stream
    # (dropout) must only depend on the training steps taken, so that a resumed run continues exactly.
    return DataLoader(dataset.remove_columns("length"), batch_size=batch_size, sampler=sampler, collate_fn=collate,
                      generator=torch.Generator().manual_seed(seed))
