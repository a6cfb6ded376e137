"""Multitask prompt tuning (Wang et al., ICLR 2023): a shared prompt P [N, d] and, per task k, low-rank factors
u_k [N, r] and v_k [r, d]; task k's prompt is P * (u_k v_k) (element-wise), inserted like prompt tuning.

A source run trains P and every source task's factors on a multi-task recipe (plainly, or distilled from
single-task teachers: the recipe's `distillation`); a target run starts P (and its tasks' factors) from a
source checkpoint in one of PEFT's three ways and trains them on the target task(s).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, model_validator

from softprompt_cli.errors import UserError
from softprompt_cli.methods.base import MethodOptions, ModelSpec, SourcePrompt, register

if TYPE_CHECKING:
    import torch
    from torch import nn

SOURCE_MODES = ("source_shared", "source_task", "source_average")
FACTOR_NOISE = 0.02
"""The spread around 1 of a new task's factors: breaks the symmetry between ranks, keeps u v near all ones."""


@register
class MultitaskPromptTuning(MethodOptions):
    """A shared prompt times each task's low-rank matrix: task-specific prompts from few parameters."""

    kind: ClassVar = "input"
    per_task: ClassVar = True
    name: Literal["multitask_prompt_tuning"] = "multitask_prompt_tuning"
    rank: int = Field(1, ge=1, description="rank r of each task's factors u_k [N, r] and v_k [r, d]")
    init: Literal["random", "text", "sample_vocab", "source_shared", "source_task", "source_average"] = Field(
        "sample_vocab",
        description="the shared prompt P: random, text (init_text's embeddings) or sample_vocab (random vocabulary "
        "rows), with new factors; or from init_checkpoint (PEFT's modes): source_shared (P only, new factors), "
        "source_task (P and init_task's factors for every task), source_average (P and the mean of the source "
        "tasks' factors)")
    init_text: str | None = Field(None, description="init: text: the text whose token embeddings start P")
    init_checkpoint: str | None = Field(
        None, description="source modes: a multitask_prompt_tuning checkpoint (or PEFT MPT adapter) of the same "
        "base model; source_shared also takes a prompt_tuning checkpoint (its prompt becomes P)")
    init_task: str | None = Field(None, description="init: source_task: the source task whose factors start every task")

    @model_validator(mode="after")
    def _init_options(self) -> MultitaskPromptTuning:
        if self.rank > self.num_virtual_tokens:
            raise ValueError(f"rank {self.rank} is above num_virtual_tokens {self.num_virtual_tokens}: u_k is "
                             f"[N, r], so a rank above N adds nothing. Use rank <= {self.num_virtual_tokens}.")
        if self.init == "text" and not (self.init_text and self.init_text.strip()):
            raise ValueError("init: text needs a non-empty init_text")
        if (self.init in SOURCE_MODES) != bool(self.init_checkpoint):
            raise ValueError(f"init: {', '.join(SOURCE_MODES)} need init_checkpoint (a source checkpoint), and "
                             "only they take one")
        if (self.init == "source_task") != (self.init_task is not None):
            raise ValueError("init: source_task needs init_task (the source task whose factors to start from), and "
                             "only it takes one")
        return self

    def for_trained(self) -> MultitaskPromptTuning:
        # sample_vocab: the cheapest start to throw away (random measures the whole vocabulary's spread)
        return self.model_copy(update={"init": "sample_vocab", "init_checkpoint": None, "init_task": None})

    def build(self, spec: ModelSpec) -> nn.Module:
        from softprompt_cli.methods._layers import TaskPrompts

        vocabulary, n, tasks = spec.vocabulary, self.num_virtual_tokens, len(spec.task_names)
        cols, rows = new_factors(tasks, n, self.rank, vocabulary.width)
        if self.init in SOURCE_MODES:
            source = spec.prompt_from_checkpoint(Path(self.init_checkpoint))
            shared, cols, rows = self._from_source(source, cols, rows, vocabulary.width)
        elif self.init == "text":
            shared = vocabulary.text(spec.tokenizer, self.init_text, n)
        elif self.init == "sample_vocab":
            shared = vocabulary.sample(n)
        else:
            shared = vocabulary.random(n)
        return TaskPrompts(shared, cols, rows)

    def _from_source(self, source: SourcePrompt, cols: torch.Tensor, rows: torch.Tensor, width: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(P, u, v) started from a source checkpoint as `init` says; every mismatch is the user's to fix."""
        where = f"method.init_checkpoint {self.init_checkpoint!r}"
        allowed = ("multitask_prompt_tuning", "prompt_tuning") if self.init == "source_shared" else (self.name,)
        if source.method not in allowed:
            raise UserError(f"{where} is a {source.method} checkpoint; init: {self.init} needs a "
                            f"{' or '.join(allowed)} checkpoint. Point it at a source run's best/ or final/.")
        shared = source.tensors["embedding"]
        if tuple(shared.shape) != (self.num_virtual_tokens, width):
            raise UserError(f"{where} has a prompt of {shared.shape[0]} virtual tokens of width {shared.shape[1]}; "
                            f"this run needs {self.num_virtual_tokens} of width {width}. Set "
                            f"method.num_virtual_tokens: {shared.shape[0]} (as the source run had).")
        if self.init == "source_shared":
            return shared.float().clone(), cols, rows
        source_cols, source_rows = source.tensors["task_cols"].float(), source.tensors["task_rows"].float()
        if source_cols.shape[-1] != self.rank:
            raise UserError(f"{where} has factors of rank {source_cols.shape[-1]}; this run has method.rank "
                            f"{self.rank}. Set method.rank: {source_cols.shape[-1]}.")
        if self.init == "source_task":
            if self.init_task not in source.task_names:
                raise UserError(f"method.init_task {self.init_task!r} is not a task of {where} (its tasks: "
                                f"{', '.join(source.task_names)}). Name one of them.")
            index = source.task_names.index(self.init_task)
            one_cols, one_rows = source_cols[index], source_rows[index]
        else:
            one_cols, one_rows = source_cols.mean(0), source_rows.mean(0)
        tasks = cols.shape[0]
        return (shared.float().clone(), one_cols.expand(tasks, -1, -1).clone(),
                one_rows.expand(tasks, -1, -1).clone())


def new_factors(tasks: int, n: int, rank: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """New tasks' factors u [tasks, N, r] and v [tasks, r, d] with u v near all ones: a new task's prompt starts
    as the shared prompt. (PEFT draws both from N(0, 0.02), so P * u v starts near zero, whatever P was.)"""
    import torch

    cols = 1 + FACTOR_NOISE * torch.randn(tasks, n, rank)
    rows = (1 + FACTOR_NOISE * torch.randn(tasks, rank, width)) / rank
    return cols, rows
