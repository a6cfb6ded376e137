"""Cheap checks of command-line arguments, made before a command's heavy modules (torch, transformers) are
imported: a missing --input file or checkpoint folder is refused at once, not after seconds of imports."""

from __future__ import annotations

import re
from pathlib import Path

from softprompt_cli.config.schema import Recipe
from softprompt_cli.errors import UserError

INPUT_KINDS = "a .csv, .tsv, .jsonl or .parquet file"
PEFT_ADAPTER_CONFIG = "adapter_config.json"  # what marks a PEFT adapter folder (artifacts.peft reads it)


def check_predict_input(input_file: Path | None, texts: list[str], text_pairs: list[str]) -> None:
    """predict reads either --input FILE (an existing file) or --text (with one --text-pair each, if any)."""
    if (input_file is None) == (not texts):
        raise UserError("give either --input FILE or --text \"...\" (not both, not neither).")
    if input_file is not None:
        if input_file.is_dir():
            raise UserError(f"--input {str(input_file)!r} is a folder, not a file. Give {INPUT_KINDS}.")
        if not input_file.is_file():
            raise UserError(f"--input {str(input_file)!r} does not exist. Give {INPUT_KINDS}.")
    elif text_pairs and len(text_pairs) != len(texts):
        raise UserError("give one --text-pair per --text.")


PRECISION_OPTIONS = ("checkpoint", "fp32", "bf16")
"""eval's and predict's --precision: as the checkpoint trained (its training.mixed_precision), or one for all."""


def check_precision_option(option: str) -> None:
    if option not in PRECISION_OPTIONS:
        raise UserError(f"--precision {option!r} is not one of {', '.join(PRECISION_OPTIONS)}: checkpoint runs each "
                        "checkpoint in the precision it trained in (training.mixed_precision), fp32 and bf16 run "
                        "every checkpoint in that one.")


DEVICE_FORM = re.compile(r"auto|cpu|cuda(:\d+)?")
"""predict's and serve's --device (softprompt_cli.devices resolves it once torch is imported)."""


def check_device_option(option: str) -> None:
    if not DEVICE_FORM.fullmatch(option):
        raise UserError(f"--device {option!r} is not auto, cpu, cuda or cuda:N (e.g. cuda:1). auto runs on the first "
                        "GPU when torch sees one, else on the CPU.")


def check_checkpoint_folder(checkpoint: Path) -> None:
    """A checkpoint (or PEFT adapter) is a folder; a missing one is refused before loading anything."""
    if not checkpoint.is_dir():
        what = "is a file, not a checkpoint folder" if checkpoint.exists() else "does not exist"
        raise UserError(f"checkpoint folder {str(checkpoint)!r} {what}. Give a folder written by `softprompt train` "
                        "(e.g. runs/<recipe>/best) or a PEFT prompt-learning adapter folder.")


SOURCE_KEYS = ("glue_task", "dir", "dataset", "dataset_config", "files", "train_split", "eval_split",
               "validation_fraction", "split_seed")
"""Data keys that say where the data comes from: --data FILE replaces them all."""
FILE_KEYS = ("format", "columns", "encoding")
"""Data keys that describe the checkpoint's own files: --data FILE starts from their defaults."""


def _overridden_keys(overrides: list[str]) -> list[str]:
    """The data keys the overrides set (data.files.train=x sets files); anything outside data. is refused."""
    keys = []
    for override in overrides:
        key, sep, _ = override.partition("=")
        if not sep or not key.startswith("data.") or key == "data.":
            raise UserError(f"eval takes overrides of the data section only, as data.KEY=VALUE (e.g. "
                            f"data.max_eval_samples=50); {override!r} is not one. The model, method, task and training "
                            "of a checkpoint are fixed when it is trained: to change them, train again.")
        keys.append(key.split(".")[1])
    return keys


def check_eval_options(directory: Path, split: str | None, data_recipe: Recipe | None, data_file: Path | None,
                       overrides: list[str]) -> list[str]:
    """The data keys the overrides set; conflicting options are refused before anything is loaded."""
    keys = _overridden_keys(overrides)
    peft = (directory / PEFT_ADAPTER_CONFIG).is_file()
    if data_recipe is None and peft:
        raise UserError(f"{str(directory)!r} is a PEFT adapter, which says nothing about data: give --recipe "
                        "RECIPE to evaluate it on that recipe's eval split (and --data FILE for another file).")
    if data_recipe is not None and data_file is not None and not peft:
        raise UserError("give either --recipe RECIPE (evaluate on that recipe's data) or --data FILE (a labelled "
                        "file read with the checkpoint's own text and label fields), not both.")
    if data_file is not None:
        if split is not None:
            raise UserError(f"--data {str(data_file)!r} is the data evaluated, all of it; --split chooses a split of "
                            "a recipe's data. Drop --split (or --data).")
        clash = sorted({k for k in keys if k in SOURCE_KEYS})
        if clash:
            raise UserError(f"--data {str(data_file)!r} replaces the data source, so the override(s) of "
                            f"{', '.join('data.' + k for k in clash)} would have no effect. Drop them (or --data).")
        if not data_file.is_file():
            raise UserError(f"--data {str(data_file)!r} does not exist (or is not a file). Give a labelled csv, "
                            "tsv, jsonl or parquet file.")
    if "max_train_samples" in keys:
        raise UserError("eval reads no training examples, so data.max_train_samples would have no effect; to "
                        "evaluate fewer examples, use data.max_eval_samples.")
    if split is not None and "eval_split" in keys:
        raise UserError("--split and data.eval_split both choose the split to evaluate; give one of them.")
    return keys
