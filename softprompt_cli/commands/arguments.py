"""Cheap checks of command-line arguments, made before a command's heavy modules (torch, transformers) are
imported: a missing --input file or checkpoint folder is refused at once, not after seconds of imports."""

from __future__ import annotations

from pathlib import Path

from softprompt_cli.errors import UserError

INPUT_KINDS = "a .csv, .tsv, .jsonl or .parquet file"


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


def check_checkpoint_folder(checkpoint: Path) -> None:
    """A checkpoint (or PEFT adapter) is a folder; a missing one is refused before loading anything."""
    if not checkpoint.is_dir():
        what = "is a file, not a checkpoint folder" if checkpoint.exists() else "does not exist"
        raise UserError(f"checkpoint folder {str(checkpoint)!r} {what}. Give a folder written by `softprompt train` "
                        "(e.g. runs/<recipe>/best) or a PEFT prompt-learning adapter folder.")
