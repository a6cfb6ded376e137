"""What is known about GLUE tasks: where their files are, their text fields, labels and metrics.

Imports nothing heavy: `softprompt validate` uses it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GLUE_HUB_ID = "nyu-mll/glue"


@dataclass(frozen=True)
class GlueTask:
    folder: str
    """Sub-folder of a classic GLUE_DIR."""
    text_columns: tuple[str, ...]
    """Text columns in the GLUE_DIR tsv files."""
    label_column: str
    hub_text_fields: tuple[str, ...]
    label_names: tuple[str, ...]
    metrics: tuple[str, ...]
    headerless_columns: tuple[str, ...] | None = None
    """Column names for tsv files that have no header row (CoLA)."""
    split_files: dict[str, str] = field(
        default_factory=lambda: {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}
    )


GLUE_TASKS: dict[str, GlueTask] = {
    "mrpc": GlueTask(
        folder="MRPC",
        text_columns=("#1 String", "#2 String"),
        label_column="Quality",
        hub_text_fields=("sentence1", "sentence2"),
        label_names=("not_equivalent", "equivalent"),
        metrics=("accuracy", "f1"),
    ),
    "sst2": GlueTask(
        folder="SST-2",
        text_columns=("sentence",),
        label_column="label",
        hub_text_fields=("sentence",),
        label_names=("negative", "positive"),
        metrics=("accuracy",),
    ),
    "cola": GlueTask(
        folder="CoLA",
        text_columns=("sentence",),
        label_column="label",
        hub_text_fields=("sentence",),
        label_names=("unacceptable", "acceptable"),
        metrics=("matthews_correlation", "accuracy"),
        headerless_columns=("source", "label", "original_mark", "sentence"),
    ),
    "qnli": GlueTask(
        folder="QNLI",
        text_columns=("question", "sentence"),
        label_column="label",
        hub_text_fields=("question", "sentence"),
        label_names=("entailment", "not_entailment"),
        metrics=("accuracy",),
    ),
    "rte": GlueTask(
        folder="RTE",
        text_columns=("sentence1", "sentence2"),
        label_column="label",
        hub_text_fields=("sentence1", "sentence2"),
        label_names=("entailment", "not_entailment"),
        metrics=("accuracy",),
    ),
    "wnli": GlueTask(
        folder="WNLI",
        text_columns=("sentence1", "sentence2"),
        label_column="label",
        hub_text_fields=("sentence1", "sentence2"),
        label_names=("not_entailment", "entailment"),
        metrics=("accuracy",),
    ),
    "qqp": GlueTask(
        folder="QQP",
        text_columns=("question1", "question2"),
        label_column="is_duplicate",
        hub_text_fields=("question1", "question2"),
        label_names=("not_duplicate", "duplicate"),
        metrics=("accuracy", "f1"),
    ),
    "mnli": GlueTask(
        folder="MNLI",
        text_columns=("sentence1", "sentence2"),
        label_column="gold_label",
        hub_text_fields=("premise", "hypothesis"),
        label_names=("entailment", "neutral", "contradiction"),
        metrics=("accuracy",),
        split_files={"train": "train.tsv", "validation": "dev_matched.tsv", "validation_matched": "dev_matched.tsv",
                     "validation_mismatched": "dev_mismatched.tsv"},
    ),
}
