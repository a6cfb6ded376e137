"""Tokenize once, pad per batch, and order examples so that batches hold similar lengths.

Tokenized examples stay plain Python lists (no Arrow tables): a few MB for GLUE-sized data, and the
process does not pay for importing `datasets`/pyarrow (about 90 MB of resident memory).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

from softprompt_cli.config.schema import Recipe, TaskSampling
from softprompt_cli.data.sources import Examples
from softprompt_cli.data.tasks import TaskData
from softprompt_cli.errors import UserError


class TokenizedRows(Dataset):
    """Columns of equal length (name -> list); `rows[i]` is one example as a dict, `rows["name"]` a column."""

    def __init__(self, columns: dict[str, list]):
        self.columns = columns

    def __len__(self) -> int:
        return len(self.columns["input_ids"])

    def __getitem__(self, key):
        if isinstance(key, str):
            return self.columns[key]
        return {name: values[key] for name, values in self.columns.items()}

    @property
    def column_names(self) -> list[str]:
        return list(self.columns)

    def without(self, name: str) -> TokenizedRows:
        return TokenizedRows({k: v for k, v in self.columns.items() if k != name})


def concatenate(parts: list[TokenizedRows]) -> TokenizedRows:
    """Rows of several tasks, one task after another (the same tokenizer: the same columns)."""
    columns = {name: [] for name in parts[0].columns}
    for part in parts:
        for name in columns:
            columns[name] += part.columns[name]
    return TokenizedRows(columns)


@dataclass(frozen=True)
class TaskMix:
    """How an epoch draws from tasks whose rows are stored one task after another."""

    sizes: tuple[int, ...]
    rule: str = "proportional"
    temperature: float = 2.0

    def counts(self) -> list[int]:
        """Rows each task gives an epoch (an epoch has as many rows as all tasks together, up to rounding)."""
        if self.rule == "proportional" or len(self.sizes) == 1:
            return list(self.sizes)
        power = 0.0 if self.rule == "uniform" else 1 / self.temperature
        weights = [size ** power for size in self.sizes]
        return [max(1, round(sum(self.sizes) * w / sum(weights))) for w in weights]

    def draw(self, generator: torch.Generator) -> list[int]:
        """One epoch's row indices: each task's rows in a fresh random order (again and again where a task gives
        more rows than it has), all tasks shuffled together."""
        if self.rule == "proportional" or len(self.sizes) == 1:
            return torch.randperm(sum(self.sizes), generator=generator).tolist()
        rows, offset = [], 0
        for size, count in zip(self.sizes, self.counts()):
            rounds = [torch.randperm(size, generator=generator) for _ in range(math.ceil(count / size))]
            rows += (torch.cat(rounds)[:count] + offset).tolist()
            offset += size
        return [rows[i] for i in torch.randperm(len(rows), generator=generator).tolist()]


def tokenize(examples: Examples, tokenizer, max_length: int, separate_pair: bool = False) -> TokenizedRows:
    """Token ids per example; with `separate_pair`, each text of a pair as its own sequence (`*_b` columns)."""
    first = [t[0] for t in examples.texts]
    second = [t[1] for t in examples.texts] if len(examples.texts[0]) == 2 else None
    if separate_pair:
        columns = dict(tokenizer(first, truncation=True, max_length=max_length))
        columns |= {f"{k}_b": v for k, v in tokenizer(second, truncation=True, max_length=max_length).items()}
        columns["length"] = [max(len(a), len(b)) for a, b in zip(columns["input_ids"], columns["input_ids_b"])]
    else:
        columns = dict(tokenizer(first, second, truncation=True, max_length=max_length))
        columns["length"] = [len(ids) for ids in columns["input_ids"]]
    columns["labels"] = list(examples.labels)
    return TokenizedRows(columns)


def tokenize_examples(recipe: Recipe, examples: Examples, tokenizer, training: bool) -> TokenizedRows:
    """The recipe's tokenization of examples: causal-LM rows, or classification rows (pairs apart for pair_mean)."""
    if recipe.task.type == "causal_lm":
        return tokenize_causal(examples, tokenizer, recipe.data.max_length, training,
                               free_form=recipe.task.target_field is not None)
    return tokenize(examples, tokenizer, recipe.data.max_length, recipe.task.pooling == "pair_mean")


def tokenize_causal(examples: Examples, tokenizer, max_length: int, training: bool, free_form: bool
                    ) -> TokenizedRows:
    """causal_lm rows. Training: input + target tokens, `labels` -100 except on the target (plus EOS for free-form
    targets, so that the model learns to stop). Evaluation: the input alone, with the label id or, for free-form
    targets, `target_index` (the row's index in examples.targets). Inputs longer than max_length keep their end,
    where the template puts its cue ("Sentiment:")."""
    inputs = tokenizer([text for text, in examples.texts])["input_ids"]
    columns: dict[str, list] = {"input_ids": [], "labels": []}
    if training:
        targets = tokenizer(examples.targets, add_special_tokens=False)["input_ids"]
        for ids, target in zip(inputs, targets):
            target = (target + [tokenizer.eos_token_id] if free_form else target)[:max_length - 1]
            ids = ids[len(ids) - (max_length - len(target)):] if len(ids) + len(target) > max_length else ids
            columns["input_ids"].append(ids + target)
            columns["labels"].append([-100] * len(ids) + target)
    elif free_form:
        columns = {"input_ids": [ids[-max_length:] for ids in inputs], "target_index": list(range(len(inputs)))}
    else:
        columns = {"input_ids": [ids[-max_length:] for ids in inputs], "labels": list(examples.labels)}
    columns["attention_mask"] = [[1] * len(ids) for ids in columns["input_ids"]]
    columns["length"] = [len(ids) for ids in columns["input_ids"]]
    return TokenizedRows(columns)


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
        per_pair = ("labels", "task_ids")
        first = [{k: v for k, v in row.items() if k not in per_pair and not k.endswith("_b")} for row in rows]
        second = [{k[:-2]: v for k, v in row.items() if k.endswith("_b")} for row in rows]
        batch = self.pad(first + second)
        for name in per_pair:
            if name in rows[0]:
                batch[name] = torch.tensor([row[name] for row in rows])
        return batch


class LengthGroupedSampler(Sampler[int]):
    """Yields indices so that each run of `batch_size` indices is a batch of similar lengths.

    Shuffled: examples are shuffled, cut into buckets of `batch_size * bucket_batches`, sorted by
    length inside each bucket, cut into batches, and the batches are shuffled. Not shuffled:
    longest first (evaluation: order does not matter, padding does). `set_epoch` reseeds, as
    for torch's DistributedSampler, so every process draws the same order.
    """

    def __init__(self, lengths: list[int], batch_size: int, shuffle: bool, group: bool, seed: int = 0,
                 bucket_batches: int = 50, mix: TaskMix | None = None):
        self.mix = mix or TaskMix((len(lengths),))
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
        return sum(self.mix.counts()) if self.shuffle else len(self.lengths)

    def __iter__(self):
        n = len(self.lengths)
        if not self.shuffle:
            order = sorted(range(n), key=lambda i: -self.lengths[i]) if self.group else list(range(n))
            yield from order
            return
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = self.mix.draw(generator)
        n = len(order)
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
        shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
        # The longest batch first: the memory it needs is then taken while the heap is unfragmented, and
        # every later (shorter) batch reuses it; running out of memory happens at once, not hours in.
        longest = max(range(len(shuffled)), key=lambda i: self.lengths[shuffled[i][0]], default=None)
        if longest is not None:
            shuffled.insert(0, shuffled.pop(longest))
        for batch in shuffled:
            yield from batch
        for batch in short:
            yield from batch


def loader(dataset: TokenizedRows, tokenizer, batch_size: int, shuffle: bool, group_by_length: bool,
           seed: int = 0, mix: TaskMix | None = None) -> DataLoader:
    sampler = LengthGroupedSampler(dataset["length"], batch_size, shuffle, group_by_length, seed, mix=mix)
    if "input_ids_b" in dataset.column_names:
        collate = SeparatePairCollator(tokenizer)
    elif "labels" in dataset.column_names and isinstance(dataset[0]["labels"], list):  # causal_lm token targets
        collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
    else:
        collate = DataCollatorWithPadding(tokenizer)
    # Its own generator: creating an iterator then never draws from the global RNG, whose stream
    # (dropout) must only depend on the training steps taken, so that a resumed run continues exactly.
    return DataLoader(dataset.without("length"), batch_size=batch_size, sampler=sampler, collate_fn=collate,
                      generator=torch.Generator().manual_seed(seed))


def task_rows(recipe: Recipe, tasks: list[TaskData], tokenizer, training: bool,
              model_tasks: list[str] | None = None) -> TokenizedRows:
    """Every task's examples tokenized as its own recipe says, one task after another; multi-task rows carry
    their task's index among `model_tasks` (default: the tasks') as `task_ids`, and free-form targets their index
    in all tasks' targets together."""
    parts, targets_before = [], 0
    model_tasks = model_tasks or [task.name for task in tasks]
    for task in tasks:
        index = model_tasks.index(task.name)
        examples = task.train if training else task.eval
        rows = tokenize_examples(task.recipe, examples, tokenizer, training)
        if "target_index" in rows.columns:
            rows.columns["target_index"] = [i + targets_before for i in rows.columns["target_index"]]
            targets_before += len(examples.targets or [])
        if recipe.is_multitask:
            rows.columns["task_ids"] = [index] * len(rows)
        parts.append(rows)
    return concatenate(parts)


def task_mix(sampling: TaskSampling, tasks: list[TaskData]) -> TaskMix:
    return TaskMix(tuple(len(task.train) for task in tasks), sampling.rule, sampling.temperature)


def training_loader(recipe: Recipe, tasks: list[TaskData], tokenizer, rows: TokenizedRows | None = None
                    ) -> DataLoader:
    """Every task's examples -> tokens (`rows`, where they are tokenized already) -> shuffled batches, mixing the
    tasks as task_sampling says, seeded. Batches of similar lengths with training.group_by_length (training's set-up
    decides `auto` for the model first; left to `auto`, as by a script, they are grouped)."""
    cfg = recipe.training
    grouped = cfg.group_by_length is not False
    if rows is None:
        rows = task_rows(recipe, tasks, tokenizer, training=True)
    return loader(rows, tokenizer, cfg.batch_size, True, grouped, cfg.seed, task_mix(recipe.task_sampling, tasks))


def evaluation_loader(recipe: Recipe, tasks: list[TaskData], tokenizer, model_tasks: list[str] | None = None
                      ) -> DataLoader:
    """Every task's evaluation examples -> tokens -> batches of similar lengths, longest first (`model_tasks`:
    the model's tasks, where only some are evaluated)."""
    rows = task_rows(recipe, tasks, tokenizer, training=False, model_tasks=model_tasks)
    return loader(rows, tokenizer, recipe.training.eval_batch_size, False, True)
