"""The recipe schema: pydantic models, one per section, and the recipe class with the registered methods.

Imports no torch: `softprompt validate` and `--help` must stay fast.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from softprompt_cli.data.glue import GLUE_TASKS
from softprompt_cli.data.templates import template_fields
from softprompt_cli.methods.base import registry
from softprompt_cli.metrics import KNOWN_METRICS


class Section(BaseModel):
    # allow_inf_nan=False: a recipe's .inf or .nan (training.lr: .inf) would train to NaN weights.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ModelSection(Section):
    name_or_path: str = Field(description="local folder or Hugging Face Hub id of the frozen base model")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    gguf_file: str | None = Field(
        None, description="a GGUF file inside name_or_path to load (dequantized) instead of safetensors weights")


class DataSection(Section):
    glue_task: str | None = Field(None, description="a GLUE task name: " + ", ".join(GLUE_TASKS))
    dir: str | None = Field(None, description="GLUE_DIR-style folder for glue_task (default: $GLUE_DIR, else the Hub)")
    dataset: str | None = Field(None, description="a Hugging Face Hub dataset id")
    dataset_config: str | None = None
    files: dict[str, str] | None = Field(None, description="split name -> local csv/tsv/jsonl/parquet file")
    format: Literal["csv", "tsv", "jsonl", "parquet"] | None = Field(None, description="default: from the extension")
    columns: list[str] | None = Field(None, description="column names for csv/tsv files without a header row")
    encoding: str = Field("utf-8", description="text encoding of csv/tsv/jsonl files (e.g. latin-1)")
    text_fields: list[str] | None = Field(None, min_length=1, max_length=2,
                                          description="one text field, or two for pairs")
    label_field: str | None = None
    label_names: list[str] | None = Field(None, min_length=2)
    train_split: str = "train"
    eval_split: str = "validation"
    max_length: int = Field(128, ge=8, description="tokens per example, before the virtual tokens")
    max_train_samples: int | None = Field(None, ge=1)
    max_eval_samples: int | None = Field(None, ge=1)
    validation_fraction: float | None = Field(
        None, gt=0, lt=0.5, description="hold out this fraction of the train split (shuffled with split_seed) as the "
        "eval split, named eval_split; for data without a validation split")
    split_seed: int = Field(0, description="seed of the validation_fraction shuffle (the same seed, the same split)")

    @model_validator(mode="after")
    def _one_source(self) -> DataSection:
        sources = [name for name in ("glue_task", "dataset", "files") if getattr(self, name) is not None]
        if len(sources) != 1:
            raise ValueError(
                "give exactly one data source: glue_task, dataset or files"
                + (f" (got {', '.join(sources)})" if sources else "")
            )
        if self.glue_task is not None and self.glue_task not in GLUE_TASKS:
            raise ValueError(f"glue_task {self.glue_task!r} is not one of {', '.join(GLUE_TASKS)}")
        if self.files is not None:
            needed = (self.train_split,) if self.validation_fraction else (self.train_split, self.eval_split)
            missing = [split for split in needed if split not in self.files]
            if missing:
                raise ValueError(f"files has no entry for split(s) {', '.join(missing)}")
        return self

    @model_validator(mode="after")
    def _known_encoding(self) -> DataSection:
        try:
            "a".encode(self.encoding)  # LookupError for unknown names and for bytes-to-bytes codecs (base64)
        except (LookupError, UnicodeError):
            raise ValueError(f"encoding {self.encoding!r} is not a known text encoding; use e.g. utf-8, latin-1, "
                             "cp1252 or utf-16") from None
        return self

    @model_validator(mode="after")
    def _held_out_split(self) -> DataSection:
        """validation_fraction names its held-out part eval_split, which must not be a split the data has."""
        if self.validation_fraction is None:
            return self
        if self.eval_split == self.train_split:
            raise ValueError(f"validation_fraction holds out part of {self.train_split!r} as the eval split; "
                             "eval_split must name that held-out part, not the train split (e.g. validation)")
        existing = (list(self.files or {}) if self.files is not None
                    else list(GLUE_TASKS[self.glue_task].split_files) if self.glue_task in GLUE_TASKS else [])
        if self.eval_split in existing:
            raise ValueError(f"validation_fraction holds out part of {self.train_split!r} as eval split "
                             f"{self.eval_split!r}, but the data already has a split of that name; set eval_split to "
                             "a new name (e.g. heldout), or remove validation_fraction to evaluate on that split")
        return self


class TaskSection(Section):
    type: Literal["sequence_classification", "causal_lm"] = Field(
        "sequence_classification",
        description="sequence_classification: a head over the frozen model; causal_lm (decoder models): the model "
        "writes a target text after a prompt built from template",
    )
    template: str | None = Field(
        None, description="causal_lm: the model's input, with {column} placeholders, e.g. 'Review: {sentence}\\n"
        "Sentiment:'")
    label_words: dict[str | int, str] | None = Field(
        None, description="causal_lm: label name (or id) -> the text the model should write, e.g. {negative: ' bad', "
        "positive: ' good'}; evaluation ranks the label words (rank classification)")
    target_field: str | None = Field(
        None, description="causal_lm: a column holding free-form target texts; evaluation generates (exact match)")
    max_new_tokens: int = Field(32, ge=1, description="causal_lm with target_field: tokens generated at evaluation")
    pooling: Literal["model", "mean", "pair_mean"] = Field(
        "model",
        description="model: the model's own head ([CLS] pooler or last real token); "
        "mean: a new linear head over the mean of the real tokens' hidden states; "
        "pair_mean (sentence pairs): each text encoded alone (with the prompt), mean-pooled and normalized, "
        "a new linear head over [u, v, |u-v|, u*v] (Sentence-BERT's classifier)",
    )
    prompt_position: Literal["after_special", "start"] = Field(
        "after_special",
        description="where input-level virtual tokens go: after a leading [CLS]/<s> (so the model's own head still "
        "reads [CLS]), or at the very start (PEFT's layout, needed to export to PEFT)",
    )
    metrics: list[str] | None = Field(None, description="default: the GLUE task's metrics, else accuracy")
    main_metric: str | None = Field(None, description="selects the best checkpoint (default: the first metric)")
    positive_label: str | int | None = Field(
        None, description="the label (a label name) F1, precision and recall are computed for; default: the second "
        "label with two labels (label id 1), macro averages over the labels with more")

    def positive_index(self, label_names: list[str]) -> int | None:
        """The label id F1, precision and recall are for (None: label 1 of two, else macro averages); ValueError
        names an unknown positive_label."""
        if self.positive_label is None:
            return None
        name = str(self.positive_label)
        if name not in label_names:
            raise ValueError(f"task.positive_label {name!r} is not one of the labels {label_names}; set it to one "
                             "of them (or remove it: the second label with two labels, macro averages with more)")
        return label_names.index(name)

    @model_validator(mode="after")
    def _positive_label_needs_labels(self) -> TaskSection:
        if self.positive_label is not None and self.target_field is not None:
            raise ValueError("positive_label is for labels; task.target_field has free-form targets (exact_match)")
        return self

    @model_validator(mode="after")
    def _causal_lm_fields(self) -> TaskSection:
        lm_only = [name for name in ("template", "label_words", "target_field") if getattr(self, name) is not None]
        if self.type != "causal_lm":
            if lm_only:
                raise ValueError(f"{', '.join(lm_only)} belong to task.type: causal_lm")
            return self
        if not self.template:
            raise ValueError("task.type: causal_lm needs a template, e.g. 'Review: {sentence}\\nSentiment:'")
        try:
            fields = template_fields(self.template)
        except ValueError as err:
            raise ValueError(f"template {self.template!r} is not a valid template ({err}); write columns as "
                             "{column} and literal braces as {{ }}") from None
        if not fields:
            raise ValueError(f"template {self.template!r} names no column; put the input in it as {{column}}")
        if (self.label_words is None) == (self.target_field is None):
            raise ValueError("task.type: causal_lm needs exactly one of label_words (classification by the words the "
                             "model writes) or target_field (free-form target texts)")
        empty = [key for key, word in (self.label_words or {}).items() if not word.strip()]
        if empty:
            raise ValueError(f"label_words for {', '.join(map(repr, empty))} are empty; give every label a word")
        words = list((self.label_words or {}).values())
        if len(set(words)) != len(words):
            raise ValueError("two labels have the same label word; each label needs its own")
        if self.pooling != "model" or self.prompt_position != "after_special":
            raise ValueError("pooling and prompt_position are for sequence_classification; causal_lm puts the prompt "
                             "first and reads the model's own next-token predictions")
        return self

    @model_validator(mode="after")
    def _known_metrics(self) -> TaskSection:
        unknown = [m for m in self.metrics or [] if m not in KNOWN_METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(KNOWN_METRICS)}")
        if self.main_metric is not None and self.metrics is not None and self.main_metric not in self.metrics:
            raise ValueError(f"main_metric {self.main_metric!r} is not in metrics")
        return self


class TrainingSection(Section):
    lr: float = Field(1e-2, gt=0, description="learning rate of the prompt parameters")
    head_lr: float | None = Field(None, gt=0, description="learning rate of the head (default: lr)")
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(16, ge=1, description="per process, per step")
    eval_batch_size: int = Field(64, ge=1)
    epochs: int = Field(5, ge=1)
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    warmup_steps: int | None = Field(None, ge=0, description="overrides warmup_ratio")
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16", "auto"] = Field(
        "no", description="autocast of training (and of the checkpoints' evaluation and predictions): no (float32), "
        "fp16, bf16, or auto: bf16 where the hardware computes it natively (a GPU from Ampere on, a CPU with "
        "AVX512-BF16 or AMX), else no; the checkpoints' recipe.yaml records what ran")
    gradient_checkpointing: bool = Field(
        False, description="recompute the frozen model's activations in the backward pass: less memory, more time")
    seed: int = 42
    eval_steps: int | None = Field(None, ge=1, description="also evaluate every N optimizer steps")
    eval_each_epoch: bool = Field(
        True, description="evaluate (and keep best/) at the end of every epoch; false: only every eval_steps and at "
        "the last step (short runs over small data, where epochs are a few steps)")
    log_steps: int = Field(10, ge=1)
    save_state_steps: int | None = Field(
        None, ge=1, description="also save the resumable state every N steps (it is saved every epoch and on Ctrl-C)")
    group_by_length: bool | Literal["auto"] = Field(
        "auto", description="batches of similar length (shuffled buckets): less padding, at some cost in accuracy on "
        "short runs; auto: on, but off where a decoder's rows run packed (no padding to save)")
    tensorboard: bool = False

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _bare_no(cls, value: Any) -> Any:
        """YAML reads a bare `no` (mixed_precision: no, or training.mixed_precision=no) as false."""
        return "no" if value is False else value

    @field_validator("group_by_length", mode="before")
    @classmethod
    def _true_false_or_auto(cls, value: Any) -> Any:
        """One message for a wrong value, not one per type of the union."""
        if isinstance(value, bool) or value == "auto":
            return value
        raise ValueError(f"{value!r} is not one of true, false, auto")


class OutputSection(Section):
    dir: str | None = Field(None, description="default: runs/<recipe file name>")
    save_tokenizer: bool = False
    overwrite: bool = Field(False, description="allow writing into a folder that holds an earlier run")


TASK_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"
SINGLE_TASK = "default"
"""The task name of a single-task recipe (its checkpoints' only task)."""
MODEL_WIDE_TASK_FIELDS = ("type", "pooling", "prompt_position")
"""Task settings that shape the one model all tasks share: every task of a multi-task recipe must agree on them."""


class TaskEntry(Section):
    """One task of a multi-task recipe: its name, data and task settings."""

    name: str = Field(pattern=TASK_NAME_PATTERN, max_length=64,
                      description="the task's name: letters, digits, _ and - (rows name it in predict's task column)")
    data: DataSection
    task: TaskSection = TaskSection()


class TaskSampling(Section):
    """How a multi-task epoch draws its examples from the tasks (seeded by training.seed and the epoch)."""

    rule: Literal["proportional", "temperature", "uniform"] = Field(
        "proportional", description="proportional: every example once per epoch; temperature: task k drawn with "
        "probability proportional to size_k^(1/temperature) (small tasks repeated, large ones cut); uniform: every "
        "task equally often")
    temperature: float = Field(2.0, ge=1, description="rule: temperature (1 is proportional)")


class Distillation(Section):
    """Source training by distillation (MPT's paper): each task's rows also learn the logits (KL) and last hidden
    states (MSE) of an existing single-task softprompt checkpoint of that task, its teacher."""

    teachers: dict[str, str] = Field(min_length=1, description="task name -> checkpoint folder of its teacher")
    logits_weight: float = Field(1.0, ge=0, description="weight of KL(teacher || student) on the logits")
    hidden_weight: float = Field(1.0, ge=0, description="weight of the MSE between last hidden states")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of the logit distillation")


def _check_task_fits_data(data: DataSection, task: TaskSection) -> None:
    if task.metrics and ("exact_match" in task.metrics) != (task.target_field is not None):
        raise ValueError("metric exact_match is for causal_lm with target_field (generated texts), and the only "
                         "metric there; classification metrics are for labels")
    if task.type != "causal_lm" and data.glue_task is None and data.text_fields is None:
        raise ValueError("data.text_fields is required when the data is not a GLUE task (causal_lm reads the "
                         "columns its template names instead)")
    if task.type == "causal_lm" and data.text_fields:
        raise ValueError("task.type: causal_lm reads the columns its template names; remove data.text_fields")
    if task.pooling == "pair_mean":
        glue_fields = GLUE_TASKS[data.glue_task].text_columns if data.glue_task else []
        fields = data.text_fields or glue_fields
        if len(fields) != 2:
            raise ValueError("task.pooling: pair_mean needs sentence pairs (two text fields); use mean or model")


class Recipe(Section):
    model: ModelSection
    data: DataSection | None = Field(None, description="the data of a single-task recipe (or give tasks)")
    task: TaskSection = TaskSection()
    tasks: list[TaskEntry] | None = Field(
        None, min_length=1, description="a multi-task recipe: several tasks, each with its name, data and task "
        "settings (instead of data and task)")
    task_sampling: TaskSampling = TaskSampling()
    distillation: Distillation | None = None
    training: TrainingSection = TrainingSection()
    output: OutputSection = OutputSection()
    compare: dict[str, dict[str, Any]] | None = Field(
        None, description="softprompt compare: per-method dotted overrides, e.g. prefix_tuning: {training.lr: 1e-2}")

    @model_validator(mode="after")
    def _compare_names_methods(self) -> Recipe:
        unknown = [name for name in self.compare or {} if name not in registry()]
        if unknown:
            raise ValueError(f"compare: {', '.join(unknown)} is not a method; the methods are {', '.join(registry())}")
        return self

    @model_validator(mode="after")
    def _data_or_tasks(self) -> Recipe:
        if (self.data is None) == (self.tasks is None):
            raise ValueError("give data (and task) for one task, or tasks (each with name, data and task) for "
                             "several" + (", not both" if self.data is not None else ""))
        if self.tasks is None:
            if self.distillation is not None or "task_sampling" in self.model_fields_set:
                raise ValueError("distillation and task_sampling are for multi-task recipes (tasks)")
            return self
        if "task" in self.model_fields_set:
            raise ValueError("a multi-task recipe sets task under each task (tasks[i].task), not at the top")
        names = [entry.name for entry in self.tasks]
        if SINGLE_TASK in names:  # checkpoints, metrics and predict read that name as "a single-task recipe"
            raise ValueError(f"task name {SINGLE_TASK!r} is reserved for the only task of a single-task recipe; "
                             "give that task another name")
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"task name(s) {', '.join(twice)} appear more than once in tasks; give every task its "
                             "own name")
        for field_name in MODEL_WIDE_TASK_FIELDS:
            values = {getattr(entry.task, field_name) for entry in self.tasks}
            if len(values) > 1:
                raise ValueError(f"the tasks share one model, so they must agree on task.{field_name} (got "
                                 f"{', '.join(sorted(map(str, values)))})")
        if len({entry.task.target_field is None for entry in self.tasks}) > 1:
            raise ValueError("the tasks mix label tasks and free-form target_field tasks; train them in separate "
                             "recipes (evaluation either ranks labels or generates texts)")
        teachers = set(self.distillation.teachers) if self.distillation else set()
        if self.distillation is not None and teachers != set(names):
            extra, missing = sorted(teachers - set(names)), sorted(set(names) - teachers)
            raise ValueError("distillation.teachers needs one teacher checkpoint for every task"
                             + (f"; {', '.join(extra)} not in tasks ({', '.join(names)})" if extra else "")
                             + (f"; none for {', '.join(missing)}" if missing else ""))
        # What shapes the model (type, pooling, prompt_position) then reads the same through recipe.task; the
        # section is not saved with the recipe (to_dict), each task's own is.
        self.__dict__["task"] = self.tasks[0].task
        return self

    @model_validator(mode="after")
    def _task_fits_data(self) -> Recipe:
        for name, recipe in self.task_recipes():
            try:
                _check_task_fits_data(recipe.data, recipe.task)
            except ValueError as err:
                raise ValueError(f"task {name}: {err}" if self.tasks else str(err)) from None
        return self

    @property
    def is_multitask(self) -> bool:
        return self.tasks is not None

    @property
    def task_names(self) -> list[str]:
        return [entry.name for entry in self.tasks] if self.tasks else [SINGLE_TASK]

    def task_recipes(self) -> list[tuple[str, Recipe]]:
        """(name, the recipe of that task alone) for every task; a single-task recipe is its own only task."""
        if self.tasks is None:
            return [(SINGLE_TASK, self)]
        return [(entry.name, self.model_copy(update={"data": entry.data, "task": entry.task, "tasks": None,
                                                      "distillation": None, "task_sampling": TaskSampling()}))
                for entry in self.tasks]

    @property
    def model_task(self) -> TaskSection:
        """The task settings that shape the model (type, pooling, prompt_position; the tasks agree on them)."""
        return self.tasks[0].task if self.tasks else self.task

    @property
    def max_length(self) -> int:
        """The longest input any task has (the model's position budget)."""
        return max(recipe.data.max_length for _, recipe in self.task_recipes())

    @property
    def metrics(self) -> list[str]:
        """The metrics of a single-task recipe (a multi-task recipe reports each task's: `task_recipes`)."""
        if self.tasks is not None:
            return [MEAN_METRIC]
        if self.task.metrics:
            return list(self.task.metrics)
        if self.task.target_field is not None:
            return ["exact_match"]
        if self.data.glue_task:
            return list(GLUE_TASKS[self.data.glue_task].metrics)
        return ["accuracy"]

    @property
    def main_metric(self) -> str:
        """Selects the best checkpoint; a multi-task recipe's is the mean over tasks of each one's main metric."""
        if self.tasks is not None:
            return MEAN_METRIC
        return self.task.main_metric or self.metrics[0]

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data that parses back to it (without the sections its kind does not have)."""
        return self.model_dump(mode="json", exclude=self._unused_sections())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def _unused_sections(self) -> set[str]:
        """Sections the recipe's kind does not have (a multi-task recipe has no top-level data or task)."""
        if self.tasks is None:
            return {"tasks", "task_sampling", "distillation"}
        return {"data", "task"}


MEAN_METRIC = "mean"
"""A multi-task evaluation's summary: the mean over tasks of each task's main metric."""


@functools.cache
def recipe_class() -> type[Recipe]:
    """The recipe model, with `method` a union of the registered methods' options."""
    methods = tuple(registry().values())
    method_type = Annotated[Union[methods], Field(discriminator="name")]  # noqa: UP007 (a runtime tuple)
    return create_model("Recipe", __base__=Recipe, method=(method_type, ...))
