"""The frozen base model plus a soft-prompt method plus a classification head (or, for causal_lm, the
model's own LM head): one SoftPromptModel.

The wrapper, not the methods, handles where virtual tokens go, attention masks, position ids,
token type ids and which hidden state the head reads. It reads the base model and tokenizer and
changes neither (`loading.prepare_frozen` prepares them once), so several SoftPromptModels can share them.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from softprompt_cli.config.schema import SINGLE_TASK
from softprompt_cli.errors import UserError
from softprompt_cli.methods._layers import Vocabulary
from softprompt_cli.methods.base import MethodOptions, ModelSpec
from softprompt_cli.model import computed_once, heads, lm, packing, shared_pass
from softprompt_cli.model.computed_once import computing_once_pays, is_prefix
from softprompt_cli.model.first_token import first_token_enabled
from softprompt_cli.model.loading import (
    Geometry,
    cache_argument,
    config_fingerprint,
    is_decoder,
    is_prepared,
    model_head,
)
from softprompt_cli.model.prefix_capture import prefix_from_ids, text_token_ids
from softprompt_cli.model.read_tail import read_tail_enabled

PROMPT_PREFIX = "prompt."
"""Parameters and checkpoint tensors of the soft prompt start with this; the head's do not."""
TASK_HEADS_PREFIX = "heads."
"""A multi-task model's heads, one per task: heads.<task>.*"""
NOT_A_LABEL = -1e9
"""The logit of label ids a row's task does not have (multi-task rows padded to the most labels): softmax gives
them exactly 0, and log-probabilities stay finite (KL and cross-entropy never meet inf - inf)."""


def split_trained(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(prompt tensors without `prompt.`, head tensors as named in the model) of a trained state."""
    prompt = {k.removeprefix(PROMPT_PREFIX): v for k, v in tensors.items() if k.startswith(PROMPT_PREFIX)}
    return prompt, {k: v for k, v in tensors.items() if not k.startswith(PROMPT_PREFIX)}


@dataclass
class Encoded:
    """The frozen model's output for a batch of rows, before pooling and head."""

    states: torch.Tensor
    """Last hidden states [rows, length, hidden], or the input of the model's own head."""
    real_tokens: torch.Tensor
    """1 for real (not virtual, not padding) tokens."""
    attention_mask: torch.Tensor
    next_position: torch.Tensor | None = None
    """Decoders: the position id of a token appended to each row."""
    shared_states: torch.Tensor | None = None
    """Decoders: the last states [1, n, hidden] of the positions every row saw first, run once in the same pass
    (`shared_pass`); None where there were none, or where the last layer finished only the columns read."""


def _insert(values: torch.Tensor, middle: torch.Tensor, at: int) -> torch.Tensor:
    """`middle` inserted into every row of `values` at position `at`."""
    return torch.cat([values[:, :at], middle, values[:, at:]], dim=1)


def _seen_first(prefix: torch.Tensor | None, shared: torch.Tensor | None,
                blocks: shared_pass.TaskBlocks | None = None) -> int:
    """How many positions every row sees before its own tokens: a prefix's, then the `shared` ones run first (of
    several prompts' `blocks`, its own block's)."""
    seen = 0 if prefix is None else prefix.shape[-2]
    if shared is not None:
        seen += shared.shape[1] if blocks is None else blocks.length
    return seen


def _takes_token_types(base: nn.Module) -> bool:
    return "token_type_ids" in inspect.signature(base.base_model.forward).parameters


def _no_checkpoint_reader(*args) -> Any:
    raise UserError("method.init_checkpoint needs a checkpoint reader; build the model through "
                    "softprompt_cli.assemble.")


def model_spec(base: nn.Module, tokenizer, prefix_from_checkpoint: Callable | None = None,
               task_names: list[str] | None = None, prompt_from_checkpoint: Callable | None = None) -> ModelSpec:
    """What methods may know of the base model (and the tasks); reading it changes nothing."""
    geometry = Geometry.of(base.config)
    fingerprint = config_fingerprint(base.config)
    readers = [_no_checkpoint_reader if reader is None else functools.partial(reader, fingerprint=fingerprint)
               for reader in (prefix_from_checkpoint, prompt_from_checkpoint)]
    return ModelSpec(
        hidden_size=geometry.hidden_size, num_layers=geometry.num_layers, num_kv_heads=geometry.num_kv_heads,
        head_dim=geometry.head_dim, vocabulary=Vocabulary(base.get_input_embeddings()), tokenizer=tokenizer,
        fingerprint=fingerprint,
        prefix_from_text=lambda text, n: prefix_from_ids(base, text_token_ids(tokenizer, text), n),
        prefix_from_checkpoint=readers[0], task_names=list(task_names or [SINGLE_TASK]),
        prompt_from_checkpoint=readers[1],
    )


def _output_layer(head: nn.Module) -> tuple[str, nn.Linear]:
    """A head's output layer: its last Linear, and its name inside the head ('' for a Linear head)."""
    layers = [(name, module) for name, module in head.named_modules() if isinstance(module, nn.Linear)]
    if not layers:
        raise UserError(f"the model's own head ({type(head).__name__}) has no Linear output layer to give each task "
                        "its labels. Use task.pooling: mean, which adds a head of its own.")
    return layers[-1]


def _resized_head(head: nn.Module, num_labels: int, init_range: float) -> nn.Module:
    """A trainable copy of a model's own head whose output layer has `num_labels` outputs."""
    copied = copy.deepcopy(head).requires_grad_(True)
    for module in copied.modules():  # the shared head's input hook must not come along
        module._forward_pre_hooks.clear()
        module.__dict__.pop("softprompt_input", None)
    name, linear = _output_layer(copied)
    fresh = nn.Linear(linear.in_features, num_labels, bias=linear.bias is not None,
                      dtype=linear.weight.dtype, device=linear.weight.device)
    nn.init.normal_(fresh.weight, std=init_range)
    if fresh.bias is not None:
        nn.init.zeros_(fresh.bias)
    if not name:
        return fresh
    copied.set_submodule(name, fresh)
    return copied


class SoftPromptModel(nn.Module):
    """A frozen transformer and a trainable soft prompt, plus a trainable classification head
    (sequence_classification) or the model's own next-token predictions (causal_lm).

    Multi-task (`num_labels` a dict task -> number of labels): one head per task, and each row carries its
    task id (`task_ids`), which picks its head and, for per-task methods (multitask prompt tuning), its prompt.
    """

    def __init__(self, base: nn.Module, method: MethodOptions, tokenizer, pooling: str, num_labels: int | dict,
                 max_length: int, prompt_position: str = "after_special",
                 task_type: str = "sequence_classification", label_word_ids: list | dict | None = None,
                 prefix_from_checkpoint: Callable | None = None, prompt_from_checkpoint: Callable | None = None):
        super().__init__()
        if not is_prepared(base):
            raise ValueError("the base model is not prepared for soft prompts: call model.loading.prepare_frozen "
                             "on it (and its tokenizer) once, or build through softprompt_cli.assemble.")
        geometry = Geometry.of(base.config)
        if geometry.max_positions and method.num_virtual_tokens + max_length > geometry.max_positions:
            raise UserError(
                f"method.num_virtual_tokens ({method.num_virtual_tokens}) + data.max_length ({max_length}) exceeds "
                f"the model's {geometry.max_positions} positions. Lower one of them."
            )
        self.base = base
        self.pooling = pooling
        self.per_task_prompt = method.per_task
        self.num_virtual_tokens = method.num_virtual_tokens
        self.is_decoder = is_decoder(base)
        self.virtual_tokens_as_prefix = self._virtual_tokens_once(method, max_length, tokenizer)
        """Decoders: virtual tokens may run through the model once per prompt, and reach every row as keys and
        values (see `virtual_token_prefix`): a loaded prompt's always; a batch's (each task's, where rows have several)
        first in the rows' pass, where that pays (`computing_once_pays`)."""
        self.kind = "prefix" if self.virtual_tokens_as_prefix else method.kind
        """How `task_prompt` gives the prompt: input embeddings (`input`) or every layer's keys and values (`prefix`).
        `encode` reads the form from the prompt it is given (`is_prefix`)."""
        self.cache_argument = cache_argument(base)
        self.causal_lm = task_type == "causal_lm"
        self.multitask = isinstance(num_labels, dict)
        self.task_names = list(num_labels) if self.multitask else [SINGLE_TASK]
        self.task_label_words = label_word_ids if isinstance(label_word_ids, dict) else {SINGLE_TASK: label_word_ids}
        """causal_lm with label words: each task's labels' tokens, scored for rank classification."""
        self.prompt = method.build(model_spec(base, tokenizer, prefix_from_checkpoint, self.task_names,
                                              prompt_from_checkpoint))
        self.insert_at = self._insert_position(tokenizer, prompt_position)
        self.head_reads_model_pooler = pooling == "model" and not self.is_decoder and not self.causal_lm
        self._attach_head(pooling, geometry, num_labels)
        self.first_token_only = self.head_reads_model_pooler and first_token_enabled(base)
        self.share_leading_tokens = self.is_decoder
        """Decoders: leading tokens every row of a batch has alike run once, as a prefix (see `computed_once`)."""
        self.read_tail_only = self.is_decoder and read_tail_enabled(base)
        """Decoders: where only the last columns' states are read (`encode`'s read_tail), the last layer finishes
        only those (see `read_tail`)."""
        self.runs_shared_first = self.is_decoder and base.config.model_type in packing.PACKED_MODEL_TYPES
        """Decoders whose models take softprompt's own 4D masks: what every row of a batch shares may run once, first
        in the rows' pass (see `shared_pass`)."""
        self.pack_rows = self.runs_shared_first
        """Decoders: rows behind a prefix they all share run packed, without padding, where that pays (see
        `packing`)."""
        self.max_length = max_length
        self.distill_weights = (1.0, 1.0, 1.0)
        """Distillation (set by training): the weights of the KL and the MSE, and the softmax temperature."""

    @property
    def label_word_ids(self) -> list[list[int]] | None:
        """The first (a single-task model's only) task's label words."""
        return self.task_label_words[self.task_names[0]]

    def _virtual_tokens_once(self, method: MethodOptions, max_length: int, tokenizer) -> bool:
        """Whether the virtual tokens can be computed once for all rows: in a decoder, tokens placed first never
        see what follows them, so their keys and values are the same in every row. Not under a sliding window
        the input could outgrow: there the rows' last tokens would stop seeing the prompt, and a prefix never
        leaves the window. Nor where the rows' token type ids reach the virtual tokens too (GPT-2 given a
        tokenizer that makes them adds their embeddings to every position)."""
        if not self.is_decoder or method.kind != "input":
            return False
        if "token_type_ids" in tokenizer.model_input_names and _takes_token_types(self.base):
            return False
        return self._within_window(method.num_virtual_tokens + max_length)

    def packs_training_rows(self, device: torch.device, batch_size: int, lengths: list[int]) -> bool:
        """Whether most shuffled training batches of `batch_size` rows of these `lengths` (tokens a row) would run
        packed (see `packing`): behind a prefix that every row of a batch shares (prefix tuning's, or virtual tokens
        run once where that pays), no sliding window could hide, on a CPU, where packing saves enough. Not with a
        prompt per task and several tasks: their rows pack each task's apart, into more and less even packed rows,
        which measured slower than grouped batches (README: packing). Not on a GPU, where grouped batches under bf16
        ran faster than shuffled ones packed (H200, SmolLM2's shape, prefix tuning: 116 against 169 ms)."""
        if self.prompts_differ_by_row or not (self.pack_rows and self.kind == "prefix" and device.type == "cpu"):
            return False
        if not lengths or not self._within_window(self.num_virtual_tokens + self.max_length):
            return False
        masks = packing.sampled_batch_masks(lengths, batch_size)
        return 2 * sum(self._batch_would_pack(device, mask) for mask in masks) > len(masks)

    def _batch_would_pack(self, device: torch.device, attention_mask: torch.Tensor) -> bool:
        saved = packing.positions_saved(attention_mask)
        return saved > 0 and (not self.virtual_tokens_as_prefix or computing_once_pays(
            device, len(attention_mask), self.num_virtual_tokens, saved))

    def _within_window(self, positions: int) -> bool:
        """Whether `positions` (a prefix and the longest row) fit in the model's sliding window, if it has one: then
        the window hides no position from any row."""
        window = getattr(self.base.config.get_text_config(), "sliding_window", None)
        return not window or positions <= window

    def _insert_position(self, tokenizer, prompt_position: str) -> int:
        """Virtual tokens go after a leading [CLS]/<s> in encoders, so that the model's own head still reads
        [CLS]; decoders read the last token, so the prompt simply goes first."""
        probe = tokenizer("x")["input_ids"]
        leading_special = bool(probe) and probe[0] in tokenizer.all_special_ids
        return 1 if (prompt_position == "after_special" and not self.is_decoder and leading_special) else 0

    def _attach_head(self, pooling: str, geometry: Geometry, num_labels: int | dict) -> None:
        self.head_prefix = None
        if self.causal_lm:
            self.head = None
            return
        if pooling in ("mean", "pair_mean"):
            dropout = getattr(self.base.config.get_text_config(), "hidden_dropout_prob", 0.1) or 0.0
            self.head_dropout = nn.Dropout(dropout)
            width = heads.mean_feature_size(pooling, geometry.hidden_size)
            if self.multitask:
                self.heads = nn.ModuleDict({task: nn.Linear(width, n) for task, n in num_labels.items()})
            else:
                self.head = nn.Linear(width, num_labels)
                self.head_prefix = "head."
        else:
            # The model's own head, registered on the base model only: its weights are saved as base.<name>.*
            name, head = model_head(self.base)
            object.__setattr__(self, "head", head)
            self.head_prefix = f"base.{name}."
            if self.multitask:  # each task its own copy, sized for its labels; the shared head stays as it is
                init_range = getattr(self.base.config, "initializer_range", 0.02)
                self.heads = nn.ModuleDict({task: _resized_head(head, n, init_range)
                                            for task, n in num_labels.items()})
        if self.multitask:
            self.head_prefix = TASK_HEADS_PREFIX

    def is_trained(self, name: str) -> bool:
        """The one rule for what trains, what is saved and what a checkpoint holds: the prompt and the head(s)."""
        return name.startswith(PROMPT_PREFIX) or (self.head_prefix is not None and name.startswith(self.head_prefix))

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.named_parameters() if self.is_trained(name)}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.trainable_state())
        if set(state) != expected:
            raise UserError(f"checkpoint tensors {sorted(state)} do not match this model's {sorted(expected)}.")
        self.load_state_dict(state, strict=False)

    def head_state(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The head's weights in `tensors` (a trained state), named as in the head module."""
        return {k.removeprefix(self.head_prefix): v for k, v in tensors.items()
                if self.head_prefix is not None and k.startswith(self.head_prefix)}

    def task_index(self, task: str) -> int:
        return self.task_names.index(task)

    def prompt_for(self, task_ids: torch.Tensor | None, rows: int) -> torch.Tensor:
        """The prompt of every row: one shared prompt (per-task methods: where every row has the same task, its
        prompt), or each row's task's prompt [rows, ...]. `task_ids` of pairs encoded apart (pair_mean: 2B
        sequences) cover both halves; None: task 0."""
        if not self.per_task_prompt:  # `encode` runs a decoder's virtual tokens once, where that pays
            return self.prompt()
        task_ids = self.row_tasks(task_ids, rows)
        tasks = task_ids.unique()
        if len(tasks) == 1:  # one prompt for every row, which `encode` may run once, as a shared prompt
            return self.prompt(tasks)[0]
        return self.prompt(task_ids)  # each task's, which `encode` may run once (`_task_prompts_once_pay`)

    def row_tasks(self, task_ids: torch.Tensor | None, rows: int) -> torch.Tensor:
        """Each of `rows` sequences' task: `task_ids` (None: task 0), given once for pairs encoded apart."""
        if task_ids is None:
            return torch.zeros(rows, dtype=torch.long, device=self.base.device)
        return torch.cat([task_ids, task_ids]) if len(task_ids) * 2 == rows else task_ids

    def prompt_groups(self, task_ids: torch.Tensor | None, rows: int) -> list[int] | None:
        """Which prompt each row has where rows of a batch may have different ones (a prompt per task, several
        tasks), for rows to pack with their own prompt's (`packing`); None: one prompt for all rows."""
        return self.row_tasks(task_ids, rows).tolist() if self.prompts_differ_by_row else None

    @property
    def prompts_differ_by_row(self) -> bool:
        """Whether the rows of a batch may have different prompts: a prompt per task, and several tasks."""
        return self.per_task_prompt and len(self.task_names) > 1

    @torch.no_grad()
    def task_prompt(self, task: str) -> torch.Tensor:
        """One task's prompt in its inference form (shared by all rows of that task), as `encode` takes it."""
        if not self.per_task_prompt:
            return self._as_encoded(self.prompt())
        return self._as_encoded(self.prompt(torch.tensor([self.task_index(task)], device=self.base.device))[0])

    def _as_encoded(self, prompt: torch.Tensor) -> torch.Tensor:
        return self.virtual_token_prefix(prompt) if self.virtual_tokens_as_prefix else prompt

    def virtual_token_prefix(self, virtual: torch.Tensor) -> torch.Tensor:
        """The keys and values that virtual tokens ([n, hidden], or [prompts, n, hidden]) placed first leave in
        every layer of a decoder: [layers, 2, prompts, kv_heads, n, head_dim]. Given as a prefix, they give every
        row the logits and gradients of the virtual tokens in its input, for one pass over n positions instead of
        one per row."""
        tokens = (virtual if virtual.dim() == 3 else virtual[None]).to(self.base.get_input_embeddings().weight.dtype)
        return self._capturing_pass(tokens, inputs_embeds=tokens)[0]

    def _capturing_pass(self, like: torch.Tensor, **inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass of `inputs` (rows and length as `like`'s first two dimensions, positions from 0) through the
        decoder: (every layer's keys and values [layers, 2, rows, kv_heads, length, head_dim], last hidden
        states)."""
        rows, length = like.shape[:2]
        positions = torch.arange(length, device=like.device).expand(rows, -1)
        captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        states = self.base.base_model(**inputs, attention_mask=positions.new_ones(rows, length), position_ids=positions,
                                      use_cache=False, softprompt_capture=captured).last_hidden_state
        return torch.stack([torch.stack(captured[layer]) for layer in sorted(captured)]), states

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, task_ids: torch.Tensor | None = None,
                **teacher: torch.Tensor) -> dict[str, torch.Tensor]:
        """Classification: logits (and the loss, given label ids). causal_lm: the loss on the target tokens
        (labels: token ids, -100 where nothing is to be predicted). `teacher` (distillation): the teacher's
        `teacher_logits` and `teacher_states` for these rows, weighed by `distill_weights`."""
        prompt, groups = self.prompt_for(task_ids, len(input_ids)), self.prompt_groups(task_ids, len(input_ids))
        if self.causal_lm:
            logits, states, keep = self.target_predictions(input_ids, attention_mask, token_type_ids, prompt, labels,
                                                           groups)
            output = {"loss": F.cross_entropy(logits, labels[:, 1:][keep]), "logits": logits}
            student_states = states if teacher else None
        else:
            encoded = self.encode(input_ids, attention_mask, token_type_ids, prompt, prompt_groups=groups)
            output = {"logits": self.task_logits(encoded, task_ids)}
            if labels is not None:
                output["loss"] = F.cross_entropy(output["logits"].float(), labels)
            student_states = distilled_states(encoded)[0] if teacher else None
        if teacher:
            output["loss"] = output["loss"] + distillation_loss(output["logits"], student_states, **teacher,
                                                                weights=self.distill_weights)
        return output

    def target_predictions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           token_type_ids: torch.Tensor | None, prompt: torch.Tensor | None, labels: torch.Tensor,
                           prompt_groups: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A decoder's (logits, hidden states) at the positions that predict a target token, and where those are
        (`keep`: [B, L - 1], labels[:, 1:] != -100): state t predicts token t + 1. Only those positions go through
        the (large) LM head. The last position predicts nothing that is scored and, behind the causal mask,
        changes no earlier state, so it is left out of the pass (one position in L fewer through every layer)."""
        columns = input_ids.shape[1] - 1
        token_type_ids = None if token_type_ids is None else token_type_ids[:, :columns]
        keep = labels[:, 1:] != -100
        read = columns - int(keep.any(0).long().argmax())  # from the first column where some row predicts a target
        states = self.encode(input_ids[:, :columns], attention_mask[:, :columns], token_type_ids, prompt,
                             read_tail=read, prompt_groups=prompt_groups).states[keep[:, -read:]]
        return self.lm_head(states).float(), states, keep

    @property
    def lm_head(self) -> nn.Module:
        return self.base.get_output_embeddings()

    @torch.no_grad()
    def scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None,
               with_prompt: bool = True, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """One score per label: the head's logits, or (causal_lm) each label word's log-likelihood after the
        input. `with_prompt=False`: the frozen model alone (the zero-shot baseline of a causal_lm template).
        Multi-task: each row's task's labels, padded with NOT_A_LABEL to the most labels of a task."""
        prompt = self.prompt_for(task_ids, len(input_ids)) if with_prompt else None
        if not self.causal_lm:
            groups = self.prompt_groups(task_ids, len(input_ids)) if with_prompt else None
            encoded = self.encode(input_ids, attention_mask, token_type_ids, prompt, prompt_groups=groups)
            return self.task_logits(encoded, task_ids)
        if task_ids is None:
            return lm.label_word_scores(self, input_ids, attention_mask, prompt, self.label_word_ids)
        return self._routed_label_word_scores(input_ids, attention_mask, prompt, task_ids)

    def _routed_label_word_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                                  prompt: torch.Tensor | None, task_ids: torch.Tensor) -> torch.Tensor:
        """Label-word scores of rows of several tasks, each row its own task's words."""
        scores = input_ids.new_full((len(input_ids), self.logit_width), NOT_A_LABEL, dtype=torch.float)
        for index in task_ids.unique().tolist():
            rows = task_ids == index
            rows_prompt = self._prompt_of_rows(prompt, rows)
            if is_prefix(rows_prompt) and rows_prompt.shape[2] > 1:  # one task's prompt, for its rows to pack behind
                rows_prompt = rows_prompt[:, :, :1]
            elif rows_prompt is not None and rows_prompt.dim() == 3:  # one task's input prompt, shared by its rows
                rows_prompt = rows_prompt[0]
            words = self.task_label_words[self.task_names[index]]
            scores[rows, :len(words)] = lm.label_word_scores(self, input_ids[rows], attention_mask[rows],
                                                             rows_prompt, words)
        return scores

    def _prompt_of_rows(self, prompt: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
        """Some rows' part of a batch's prompts (one per row: [B, n, d] or [layers, 2, B, ...]); a prompt shared
        by every row stays as it is."""
        if is_prefix(prompt) and prompt.shape[2] > 1:
            return prompt[:, :, rows]
        if prompt is not None and prompt.dim() == 3:
            return prompt[rows]
        return prompt

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 stop_ids: int | Sequence[int], sampling: lm.Sampling | None = None, with_prompt: bool = True,
                 task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Continue each (left-padded) row with up to max_new_tokens tokens (see `lm.generate`)."""
        prompt = self._generation_prompt(task_ids, len(input_ids)) if with_prompt else None
        return lm.generate(self, input_ids, attention_mask, max_new_tokens, stop_ids, prompt, sampling)

    def _generation_prompt(self, task_ids: torch.Tensor | None, rows: int) -> torch.Tensor:
        """`prompt_for` for generation, whose rows fill a cache and so cannot run several tasks' prompts first in
        their pass (`_task_prompts_once_pay`): each task's prompt runs once in a pass of its own, as a prefix, where
        rows share them (on a CPU)."""
        once = self.per_task_prompt and self.virtual_tokens_as_prefix
        if not once or self.base.device.type not in computed_once.ONCE_DEVICE_TYPES:
            return self.prompt_for(task_ids, rows)
        tasks, row_task = self.row_tasks(task_ids, rows).unique(return_inverse=True)
        if len(tasks) in (1, rows):  # one prompt (`encode` may run it once), or no row shares one
            return self.prompt_for(task_ids, rows)
        return self.virtual_token_prefix(self.prompt(tasks))[:, :, row_task]

    def _inputs_with_prompt(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            token_type_ids: torch.Tensor | None, prompt: torch.Tensor | None
                            ) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
        """(model inputs, real-token mask, attention mask, token type ids, position offset) with the prompt in."""
        if prompt is None:
            return {"input_ids": input_ids}, attention_mask, attention_mask, token_type_ids, 0
        if is_prefix(prompt):  # real tokens come after the prefix, as with a cache of n positions
            return ({"input_ids": input_ids, "softprompt_prefix": prompt}, attention_mask, attention_mask,
                    token_type_ids, prompt.shape[-2])
        batch, n, at = input_ids.shape[0], prompt.shape[-2], self.insert_at
        embeds = self.base.get_input_embeddings()(input_ids)
        virtual = prompt.to(embeds.dtype).expand(batch, -1, -1)
        ones = attention_mask.new_ones(batch, n)
        if token_type_ids is not None:
            token_type_ids = _insert(token_type_ids, ones * 0, at)
        return ({"inputs_embeds": _insert(embeds, virtual, at)}, _insert(attention_mask, ones * 0, at),
                _insert(attention_mask, ones, at), token_type_ids, 0)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None,
               prompt: torch.Tensor | None, cache: Any = None, read_tail: int | None = None,
               prompt_groups: list[int] | None = None) -> Encoded:
        """Run the frozen model with a soft prompt: shared by all rows ([n, d] or [layers, 2, 1, ...]) or
        one per row ([B, n, d] or [layers, 2, B, ...]: several tasks in one batch); None: no prompt.
        With a `cache`, a decoder keeps the keys and values of the input (not of a prefix) for generation.
        `read_tail=n`: only the last n columns' states are read, and `states` holds those alone ([B, n, hidden]).
        `prompt_groups` (one prompt per row): which rows' prompts are the same one (`prompt_groups`)."""
        if self._task_prompts_once_pay(input_ids, attention_mask, token_type_ids, prompt, cache, prompt_groups):
            return self._encode_behind_task_prompts(input_ids, attention_mask, prompt, prompt_groups, read_tail)
        plan = self._computed_once_plan(input_ids, attention_mask, token_type_ids, prompt, cache)
        if plan is None:
            return self._encode_rows(input_ids, attention_mask, token_type_ids, prompt, cache, read_tail,
                                     prompt_groups)
        starts, count = plan
        return self._encode_sharing_leading_tokens(input_ids, attention_mask, prompt, starts, count, read_tail)

    def _computed_once_plan(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            token_type_ids: torch.Tensor | None, prompt: torch.Tensor | None, cache: Any
                            ) -> tuple[torch.Tensor | None, int] | None:
        """What a decoder runs once for all rows, first in their pass (`shared_pass`), where that pays
        (`computing_once_pays`): (each row's first real column, how many tokens from there all rows share). The
        virtual tokens of an input prompt that all rows share run there too. None: every row runs everything. Not with
        a cache to fill, nor with token type ids the model reads."""
        virtual = prompt is not None and prompt.dim() == 2 and self.virtual_tokens_as_prefix
        shared_prefix = is_prefix(prompt) and prompt.shape[2] == 1
        if not (virtual or shared_prefix):
            return None
        if not self._may_run_first_in_pass(input_ids, token_type_ids, cache, prompt.shape[-2]):
            return None
        starts, count = None, 0
        if self._leading_tokens_may_pay(input_ids):
            starts = computed_once.first_real_column(attention_mask)
            count = computed_once.shared_leading_count(input_ids, attention_mask, starts)
        if not virtual:  # prefix tuning: the leading tokens alone, unless packed rows run them in the same pass
            pays = count > 0 and computing_once_pays(input_ids.device, len(input_ids), count) and not (
                self._packed_rows_run_leading_tokens(attention_mask, prompt.shape[-2], count))
            return (starts, count) if pays else None
        once = count + prompt.shape[-2]
        # virtual tokens run once let the rows pack behind them, which rows holding their own cannot
        packed_away = self._positions_packing_saves(attention_mask, None, prompt.shape[-2])
        return (starts, count) if computing_once_pays(input_ids.device, len(input_ids), once, packed_away) else None

    def _may_run_first_in_pass(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None, cache: Any,
                               prompt_length: int) -> bool:
        """Whether anything may run once, first in the rows' pass (`shared_pass`): on a device where that can pay
        (checked before counting what packing saves), with no cache to fill, no token type ids the model reads, a
        decoder that takes softprompt's 4D masks, and rows that no sliding window could hide a prompt of
        `prompt_length` from (rows longer than max_length, label words appended, could outgrow one that a prefix
        never leaves)."""
        if input_ids.device.type not in computed_once.ONCE_DEVICE_TYPES or cache is not None:
            return False
        if not self.runs_shared_first or (token_type_ids is not None and _takes_token_types(self.base)):
            return False
        return self._within_window(prompt_length + input_ids.shape[1])

    def _task_prompts_once_pay(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                               token_type_ids: torch.Tensor | None, prompt: torch.Tensor | None, cache: Any,
                               groups: list[int] | None) -> bool:
        """Whether rows of several input prompts (`groups` saying which rows' are the same) have each prompt's
        virtual tokens run once, first in their pass, each row seeing its own (`shared_pass.TaskBlocks`): as
        `_computed_once_plan` for one prompt, where that saves enough positions ((rows - prompts) x tokens, and the
        padding that rows behind them leave out when packed)."""
        if groups is None or prompt is None or prompt.dim() != 3 or not self.virtual_tokens_as_prefix:
            return False
        if not self._may_run_first_in_pass(input_ids, token_type_ids, cache, prompt.shape[1]):
            return False
        packed_away = self._positions_packing_saves(attention_mask, None, prompt.shape[1], groups)
        rows_alike = len(input_ids) - len(set(groups)) + 1  # each prompt's copies but one are saved
        return computing_once_pays(input_ids.device, rows_alike, prompt.shape[1], packed_away)

    def _encode_behind_task_prompts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                                    prompt: torch.Tensor, groups: list[int], read_tail: int | None) -> Encoded:
        """`encode` with each of several input prompts (one per row, [rows, n, d]; `groups`: which rows' are the
        same) run once, first in the rows' pass, one block after another, each row seeing its own."""
        prompts = list(dict.fromkeys(groups))  # in the order of their first rows
        blocks = shared_pass.TaskBlocks(prompt.shape[1], torch.tensor([prompts.index(group) for group in groups],
                                                                      device=input_ids.device))
        shared = prompt[[groups.index(group) for group in prompts]].flatten(0, 1)[None]
        rest = self._encode_rows(input_ids, attention_mask, token_type_ids=None, prompt=None, cache=None,
                                 read_tail=read_tail, prompt_groups=groups, shared=shared, blocks=blocks)
        return Encoded(rest.states, attention_mask, attention_mask, attention_mask.sum(-1) + prompt.shape[1])

    def _packed_rows_run_leading_tokens(self, attention_mask: torch.Tensor, prefix_length: int, count: int) -> bool:
        """Whether the rows will run packed (`_encode_packed`), with the `count` leading tokens they share first in
        each packed row, at a cost under running them once, first in the pass: a copy in each packed row but one,
        against COMPUTED_ONCE_MIN_POSITIONS."""
        if not self._positions_packing_saves(attention_mask, None, prefix_length):
            return False
        _, packed_rows, _ = packing.packed_width(attention_mask)
        return count * (packed_rows - 1) < computed_once.COMPUTED_ONCE_MIN_POSITIONS

    def _leading_tokens_may_pay(self, input_ids: torch.Tensor) -> bool:
        """Whether leading tokens could run once (where `_may_run_first_in_pass`): shared by as many rows as pay for
        it even if every column were shared."""
        return self.share_leading_tokens and computing_once_pays(input_ids.device, len(input_ids), input_ids.shape[1])

    def _encode_sharing_leading_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                                       prompt: torch.Tensor, starts: torch.Tensor | None, count: int,
                                       read_tail: int | None) -> Encoded:
        """`encode` with an input prompt's virtual tokens and the `count` leading tokens all rows share (from
        `starts`) run once, first in the rows' own pass (`shared_pass`), and the rows the rest; the shared tokens'
        states go back into every row (unless the columns read are all the rows' own tokens)."""
        shared = self._shared_embeds(input_ids, prompt, starts, count)
        own_tail = read_tail is not None and (not count or read_tail <= int(attention_mask.sum(-1).min()) - count)
        rows_ids, rows_mask = input_ids, attention_mask
        if count:
            rows_ids = computed_once.without_leading(input_ids, starts, count)
            rows_mask = computed_once.without_leading(attention_mask, starts, count)
        rest = self._encode_rows(rows_ids, rows_mask, None, prompt if is_prefix(prompt) else None, None,
                                 read_tail if own_tail else None, shared=shared)
        states = rest.states
        if count and not own_tail:
            states = computed_once.with_leading(states, rest.shared_states[:, -count:], starts)
        states = states[:, -read_tail:] if read_tail else states
        return Encoded(states, attention_mask, attention_mask, attention_mask.sum(-1) + prompt.shape[-2])

    def _shared_embeds(self, input_ids: torch.Tensor, prompt: torch.Tensor, starts: torch.Tensor | None,
                       count: int) -> torch.Tensor:
        """What every row sees first, as input embeddings [1, n, hidden]: an input prompt's virtual tokens, then the
        `count` leading tokens all rows have alike (from `starts`)."""
        embedding = self.base.get_input_embeddings()
        parts = [] if is_prefix(prompt) else [prompt.to(embedding.weight.dtype)]
        if count:
            first = int(starts[0])
            parts.append(embedding(input_ids[0, first:first + count]))
        return torch.cat(parts)[None]

    def _encode_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     token_type_ids: torch.Tensor | None, prompt: torch.Tensor | None, cache: Any,
                     read_tail: int | None = None, prompt_groups: list[int] | None = None,
                     shared: torch.Tensor | None = None, blocks: shared_pass.TaskBlocks | None = None) -> Encoded:
        """`encode`, every row's every token through the model (but the last layer's, with `read_tail`). `shared`
        (decoders): input embeddings [1, n, hidden] that every row sees first (after `prompt`, a prefix), run once
        in the same pass (`shared_pass`); `blocks`: several prompts' blocks, each row seeing its own."""
        prompt_per_row = (is_prefix(prompt) and prompt.shape[2] > 1) or blocks is not None
        groups = prompt_groups if prompt_per_row else None  # a shared prompt: one group
        if self._packing_pays(attention_mask, token_type_ids, prompt, cache, groups, shared, blocks):
            return self._encode_packed(input_ids, attention_mask, prompt, read_tail, groups, shared, blocks)
        batch = input_ids.shape[0]
        inputs, real_tokens, attention_mask, token_type_ids, offset = self._inputs_with_prompt(
            input_ids, attention_mask, token_type_ids, prompt)
        offset += _seen_first(None, shared, blocks)
        if self.is_decoder:
            positions = (attention_mask.cumsum(-1) - 1).clamp(min=0) + offset
            # A decoder would otherwise build a KV cache in every training step.
            inputs.update({self.cache_argument: cache, "use_cache": cache is not None})
        else:
            positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)[None] + offset
        inputs.update(attention_mask=attention_mask, position_ids=positions.expand(batch, -1))
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        next_position = attention_mask.sum(-1) + offset
        if self.head_reads_model_pooler:
            # The model's own head pipeline ([CLS] pooler, dropout) runs; a hook keeps the head's input.
            if self.first_token_only:
                inputs["softprompt_first_token"] = True
            self.base(**inputs)
            states, self.head.softprompt_input = self.head.softprompt_input, None
            return Encoded(states, real_tokens, attention_mask, next_position)
        shared_states, states = self._decoder_states(inputs, shared, read_tail, blocks)
        return Encoded(states, real_tokens, attention_mask, next_position, shared_states)

    def _decoder_states(self, inputs: dict[str, Any], shared: torch.Tensor | None, read: int | None,
                        blocks: shared_pass.TaskBlocks | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(the `shared` positions' last states, or None; the rows' [rows, width or `read`, hidden]) of a decoder
        run with `inputs` (the rows': input ids, a 2D or their own 4D mask, position ids, a prefix), and with
        `shared` input embeddings run first, once, in the same pass (`shared_pass`). `read`: only each row's last
        `read` columns are read (the last layer finishes those alone, where it can). `blocks`: `shared` is several
        prompts' blocks, and which each row sees."""
        finish_read = read if self.read_tail_only else None
        if shared is None:
            if finish_read:
                inputs["softprompt_read_tail"] = finish_read
            states = self.base.base_model(**inputs).last_hidden_state
            return None, states[:, -read:] if read else states
        ids, mask, positions = inputs.pop("input_ids"), inputs.pop("attention_mask"), inputs.pop("position_ids")
        prefix = inputs.get("softprompt_prefix")
        start = 0 if prefix is None else prefix.shape[-2]
        inputs |= shared_pass.shared_pass_inputs(
            shared, start, self.base.get_input_embeddings()(ids), positions,
            shared_pass.causal_rows_mask(mask) if mask.dim() == 2 else mask, finish_read, blocks)
        states = self.base.base_model(**inputs).last_hidden_state
        shared_states, rows = shared_pass.split_states(states, shared.shape[1], len(ids), finish_read)
        return shared_states, rows[:, -read:] if read else rows

    def _packing_pays(self, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None,
                      prompt: torch.Tensor | None, cache: Any, groups: list[int] | None,
                      shared: torch.Tensor | None = None, blocks: shared_pass.TaskBlocks | None = None) -> bool:
        """Whether rows run packed (see `packing`): behind a prefix they all share (or, a prefix per row, that each
        of the `groups` of rows shares; or `shared` positions run first), with no cache to fill, where packing saves
        enough positions (`_positions_packing_saves`)."""
        shares_prefix = is_prefix(prompt) and (prompt.shape[2] == 1 or groups is not None)
        if cache is not None or not (shares_prefix or shared is not None):
            return False
        seen = _seen_first(prompt, shared, blocks)
        return self._positions_packing_saves(attention_mask, token_type_ids, seen, groups) > 0

    def _positions_packing_saves(self, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None,
                                 prefix_length: int, groups: list[int] | None = None) -> int:
        """The padded positions that rows packed behind a shared prefix of `prefix_length` would leave out
        (`packing.positions_saved`): 0 where packing is off, with token type ids the model reads, or where a sliding
        window could hide the prefix from a row."""
        unhidden = self._within_window(prefix_length + attention_mask.shape[1])
        if not (self.pack_rows and unhidden) or attention_mask.all():
            return 0
        if token_type_ids is not None and _takes_token_types(self.base):
            return 0
        return packing.positions_saved(attention_mask, groups)

    def _encode_packed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt: torch.Tensor | None,
                       read_tail: int | None, groups: list[int] | None, shared: torch.Tensor | None = None,
                       blocks: shared_pass.TaskBlocks | None = None) -> Encoded:
        """`_encode_rows` with the rows packed, without padding (see `packing`): the same states. A prompt per row
        (`groups` saying which are the same): each packed row holds rows of one prompt, and has it."""
        offset = _seen_first(prompt, shared, blocks)
        in_each = self._leading_tokens_in_packed_rows(input_ids, attention_mask, read_tail)
        packed = packing.pack(input_ids, attention_mask, offset, read_tail, in_each, groups)
        prefix = prompt if groups is None or prompt is None else prompt[:, :, packed.representative]
        inputs = {"input_ids": packed.input_ids, "attention_mask": packed.attention_mask,
                  "position_ids": packed.position_ids, "softprompt_prefix": prefix, "use_cache": False,
                  self.cache_argument: None}
        if blocks is not None:  # each packed row holds one prompt's rows: it sees that prompt's block
            blocks = blocks._replace(of_row=blocks.of_row[packed.representative])
        shared_states, states = self._decoder_states(inputs, shared, packed.read if read_tail else None, blocks)
        return Encoded(packing.unpack(states, packed), attention_mask, attention_mask,
                       attention_mask.sum(-1) + offset, shared_states)

    def _leading_tokens_in_packed_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                                       read_tail: int | None) -> int:
        """How many of the leading tokens that all rows have alike run once in each packed row (see `packing`):
        all of them (`computed_once.shared_leading_count`), but those in a column read."""
        if not self.share_leading_tokens:
            return 0
        starts = computed_once.first_real_column(attention_mask)
        count = computed_once.shared_leading_count(input_ids, attention_mask, starts)
        unread = input_ids.shape[1] - int(starts.max()) - (read_tail or 0)
        return max(0, min(count, unread)) if read_tail else count

    def features(self, encoded: Encoded) -> torch.Tensor:
        """What a head reads: the model's pooler output, a decoder's last real token, or pooled hidden states."""
        if self.head_reads_model_pooler:
            return encoded.states
        if self.pooling == "model":  # decoder: the last real token, wherever the padding is
            return heads.last_real_token(encoded.states, encoded.attention_mask)
        return self.head_dropout(heads.mean_features(encoded.states, encoded.real_tokens, self.pooling))

    def classify(self, encoded: Encoded, head_state: dict[str, torch.Tensor] | None = None,
                 task: str | None = None) -> torch.Tensor:
        """Logits from encoded rows of one task (`task`: which head of a multi-task model); `head_state` swaps in
        another task's head weights."""
        head = self.heads[task or self.task_names[0]] if self.multitask else self.head
        features = _as_head_input(head, self.features(encoded))
        if head_state is None:
            return head(features)
        return torch.func.functional_call(head, head_state, (features,))

    @property
    def logit_width(self) -> int:
        """Logits per row: the labels of the task with the most."""
        if self.causal_lm:
            return max(len(words or []) for words in self.task_label_words.values())
        return max(head_module_outputs(head) for head in (self.heads.values() if self.multitask else [self.head]))

    def task_logits(self, encoded: Encoded, task_ids: torch.Tensor | None) -> torch.Tensor:
        """Logits of rows of one or several tasks: each row through its task's head, padded with NOT_A_LABEL to
        the most labels of a task."""
        if not self.multitask:
            return self.head(_as_head_input(self.head, self.features(encoded)))
        features = self.features(encoded)
        if task_ids is None:
            task_ids = torch.zeros(len(features), dtype=torch.long, device=features.device)
        logits = features.new_full((len(features), self.logit_width), NOT_A_LABEL)
        for index in task_ids.unique().tolist():
            rows = task_ids == index
            head = self.heads[self.task_names[index]]
            task_rows = head(_as_head_input(head, features[rows]))
            logits[rows, :task_rows.shape[1]] = task_rows.to(logits.dtype)
        return logits


def head_module_outputs(head: nn.Module) -> int:
    """The number of labels a head gives."""
    return _output_layer(head)[1].out_features


def distilled_states(encoded: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states distillation compares, and the row of each: the real tokens' last hidden states (the same
    tokens for a teacher and a student, whatever their prompts), or, where the model computes only its head's
    input (a pooler's output, the first token alone), that input, one per row."""
    states = encoded.states
    if states.dim() == 3 and states.shape[1] == encoded.real_tokens.shape[1]:
        real = encoded.real_tokens.bool()
        return states[real], real.nonzero()[:, 0]
    return states.reshape(len(states), -1), torch.arange(len(states), device=states.device)


def distillation_loss(logits: torch.Tensor, states: torch.Tensor, teacher_logits: torch.Tensor,
                      teacher_states: torch.Tensor, weights: tuple[float, float, float]) -> torch.Tensor:
    """MPT's distillation terms: KL(teacher || student) of the softened logits, plus the MSE of hidden states
    (`weights`: the KL's, the MSE's, and the softmax temperature)."""
    logits_weight, hidden_weight, temperature = weights
    student = (logits.float() / temperature).log_softmax(-1)
    target = (teacher_logits.float() / temperature).log_softmax(-1)
    kl = F.kl_div(student, target, log_target=True, reduction="batchmean") * temperature ** 2
    mse = F.mse_loss(states.float(), teacher_states.float())
    return logits_weight * kl + hidden_weight * mse


def _as_head_input(head: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Features in the head's dtype: a head of ours stays float32 (it trains) on a bfloat16 or float16 base model."""
    weight = next(head.parameters(), None)
    return features if weight is None or weight.dtype == features.dtype else features.to(weight.dtype)
