"""The frozen base model and its tokenizer: loading them (local folder, packaged copy, GGUF or Hub), what the
soft-prompt layers need to know about them (geometry, fingerprint), and preparing them once for soft prompts.

Several soft prompts may share one base model and tokenizer (predict, a server): everything that
changes them happens here, once, in `prepare_frozen`; building a SoftPromptModel changes nothing shared.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES
from transformers.utils import logging as hf_logging

from softprompt_cli import gguf_cache
from softprompt_cli.errors import UserError
from softprompt_cli.gguf_cache import GgufSource
from softprompt_cli.hub import gguf_file_path, hub_reachable, offline_model_error, resolve_model_reference
from softprompt_cli.model import attention, dequantized
from softprompt_cli.model.dropout import use_fast_dropout
from softprompt_cli.model.first_token import enable_first_token_only
from softprompt_cli.model.read_tail import enable_read_tail

HEAD_MODULE_NAMES = ("pre_classifier", "classifier", "score")
PREPARED_MARK = "softprompt_prepared"
_VOLATILE_CONFIG_KEYS = {
    "architectures", "id2label", "label2id", "num_labels", "problem_type", "torch_dtype", "dtype",
    "transformers_version", "pad_token_id", "use_cache", "finetuning_task", "output_attentions",
    "output_hidden_states", "return_dict",
}
_CUSTOM_CODE_REFUSAL = (
    "model {reference!r} needs its own Python code to load ({why}). softprompt runs a model's code only when the "
    "recipe allows it: set model.trust_remote_code: true only if you trust that code (read the model's .py files "
    "first); otherwise use a model that transformers supports.")
GGUF_READ_ERRORS = (ValueError, KeyError, IndexError, struct.error)
"""What reading a GGUF file that is cut short or damaged raises (transformers' reader, the gguf package's)."""
WRITE_ERRORS = (OSError, SafetensorError)
"""What writing a cache entry can raise: safetensors reports its own I/O errors (disk full included) so."""


@dataclass(frozen=True)
class Geometry:
    """The sizes of a base model that prompts and prefixes are shaped by."""

    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    max_positions: int | None

    @classmethod
    def of(cls, config) -> Geometry:
        text = config.get_text_config()
        return cls(hidden_size=text.hidden_size, num_layers=text.num_hidden_layers,
                   num_attention_heads=text.num_attention_heads,
                   num_kv_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
                   head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
                   max_positions=getattr(text, "max_position_embeddings", None))


def _refuse_custom_code(reference: str, location: str, local: bool, trust_remote_code: bool) -> None:
    """Refuse a local model whose config maps its classes to code in its folder, before transformers looks at the
    folder: nothing of it may run unless the recipe allows it."""
    config_file = Path(location) / "config.json"
    if not local or trust_remote_code or not config_file.is_file():
        return
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # transformers reports a damaged config.json itself
    if isinstance(config, dict) and config.get("auto_map") and config.get("model_type") not in CONFIG_MAPPING_NAMES:
        raise UserError(_CUSTOM_CODE_REFUSAL.format(
            reference=reference, why=f"config.json maps {', '.join(config['auto_map'])} to code in the model folder, "
                                     f"and model_type {config.get('model_type')!r} is not one transformers knows"))


def _from_pretrained(loader, reference: str, location: str, local: bool, revision: str | None, **kwargs):
    """`loader.from_pretrained(location)`, with its errors as UserErrors that name `reference`."""
    online = not local and hub_reachable()
    try:
        return loader.from_pretrained(location, revision=None if local else revision,
                                      local_files_only=not online, **kwargs)
    except OSError as err:
        if not local and not online:
            raise offline_model_error(reference) from None
        raise UserError(f"could not load {reference!r}: {err}") from None
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        raise UserError(_CUSTOM_CODE_REFUSAL.format(
            reference=reference, why="transformers: it contains custom code")) from None


def _from_gguf(loader, reference: str, location: str, local: bool, revision: str | None, gguf_file: str, **kwargs):
    """`_from_pretrained` of a GGUF file, dequantizing under our progress bar; a file that does not parse (cut
    short, damaged) is a UserError."""
    try:
        with dequantized.dequantizing_progress(gguf_file):
            return _from_pretrained(loader, reference, location, local, revision, gguf_file=gguf_file, **kwargs)
    except GGUF_READ_ERRORS as err:
        raise UserError(f"could not read GGUF file {gguf_file!r} of {reference!r} ({type(err).__name__}: {err}). "
                        "The file may be incomplete or damaged: download it again, or check model.gguf_file.") from None


def _usable_entry(source: GgufSource, repair: bool) -> Path | None:
    """The cache entry of `source` if it is whole; `repair` (with the writing lock held): remove a damaged one."""
    if not source.entry.is_dir():
        return None
    problem = gguf_cache.entry_problem(source.entry)
    if problem is None:
        return source.entry
    if repair:
        dequantized.note(f"the cached float32 copy of {source.path.name} in {str(source.entry)!r} is damaged "
                         f"({problem}): writing it again.")
        gguf_cache.remove(source.entry)
    return None


def _write_gguf_entry(reference: str, source: GgufSource) -> Path:
    """Dequantize the GGUF file (as transformers loads it) and keep the result as its cache entry."""
    folder, name = str(source.path.parent), source.path.name
    hf_logging.set_verbosity_error()  # as load_base_model: the tokenizer is loaded first, and writes the entry
    hf_logging.disable_progress_bar()
    dequantized.note(f"dequantizing {name} to float32, once: later runs load it from "
                     f"{str(gguf_cache.cache_dir())!r} (softprompt cache list, softprompt cache clear).")
    tokenizer = _from_gguf(AutoTokenizer, reference, folder, True, None, name)
    config = _from_gguf(AutoConfig, reference, folder, True, None, name)
    # The most complete model class: a causal LM keeps its LM head (untied in some models), which AutoModel drops.
    loader = AutoModelForCausalLM if _is_decoder_config(config) else AutoModel
    model = _from_gguf(loader, reference, folder, True, None, name, dtype=torch.float32)
    with gguf_cache.draft(source) as draft:
        extra = dequantized.save_dequantized(model, tokenizer, draft)
        return gguf_cache.publish(source, draft, extra)


def dequantized_gguf(reference: str, revision: str | None, gguf_file: str) -> Path | None:
    """The cache entry of the model's GGUF file, written first if it is missing or damaged; None where the cache
    cannot be written (the caller then loads the GGUF file itself)."""
    source = GgufSource.of(gguf_file_path(reference, revision, gguf_file))
    entry = _usable_entry(source, repair=False)
    if entry is not None:
        return entry
    try:
        with gguf_cache.writing_lock(source):  # a second process waits here, then finds the entry written
            return _usable_entry(source, repair=True) or _write_gguf_entry(reference, source)
    except WRITE_ERRORS as err:
        dequantized.note(f"could not keep the dequantized copy of {gguf_file} in {str(gguf_cache.cache_dir())!r} "
                         f"({err}); loading the GGUF file itself, which dequantizes it again on every run. Set "
                         "HF_HOME to a writable folder with room for it to keep it.")
        return None


def _load(loader, reference: str, revision: str | None, gguf_file: str | None = None, **kwargs):
    if gguf_file is not None and (entry := dequantized_gguf(reference, revision, gguf_file)) is not None:
        loaded = _from_pretrained(loader, reference, str(entry), True, None, **kwargs)
        return dequantized.as_loaded_from_gguf(loaded, entry)
    location, local = resolve_model_reference(reference, revision, gguf_file)
    _refuse_custom_code(reference, location, local, kwargs.get("trust_remote_code", False))
    if gguf_file is None:
        return _from_pretrained(loader, reference, location, local, revision, **kwargs)
    return _from_gguf(loader, reference, location, local, revision, gguf_file, **kwargs)


def load_tokenizer(reference: str, revision: str | None = None, trust_remote_code: bool = False,
                   gguf_file: str | None = None):
    tokenizer = _load(AutoTokenizer, reference, revision, gguf_file, trust_remote_code=trust_remote_code)
    if getattr(tokenizer, "vocab_size", len(tokenizer)) == 0:  # what transformers builds from no tokenizer files
        raise UserError(f"model {reference!r} has no tokenizer (no tokenizer files next to its config). Save the "
                        "tokenizer into the model folder (tokenizer.save_pretrained).")
    if tokenizer.pad_token is None:
        # Decoder tokenizers (GPT-2, Llama) have no pad token; the mask makes the choice irrelevant.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_config(reference: str, revision: str | None = None, trust_remote_code: bool = False):
    return _load(AutoConfig, reference, revision, trust_remote_code=trust_remote_code)


def config_fingerprint(config) -> str:
    """A hash of the architecture-defining config values, to refuse checkpoints made for another model."""
    values = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS and not k.startswith("_")}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_decoder(model: nn.Module) -> bool:
    return any(getattr(m, "is_causal", False) for m in model.modules() if hasattr(m, "layer_idx"))


def cache_argument(base: nn.Module) -> str:
    """The name the model's forward gives its KV cache: `cache` in transformers 5 (which still accepts
    `past_key_values`, with a warning, until 5.40), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(base.base_model.forward).parameters else "past_key_values"


def _is_decoder_config(config) -> bool:
    """Decoder-only: the model type has a causal-LM class and is not an encoder that merely can be one (BERT's
    BertLMHeadModel attends both ways unless is_decoder is set)."""
    encoder_like = config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not config.is_decoder
    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not encoder_like


def load_base_model(reference: str, *, revision: str | None, dtype: str, trust_remote_code: bool,
                    pooling: str, label_names: list[str], task_type: str = "sequence_classification",
                    gguf_file: str | None = None) -> nn.Module:
    hf_logging.set_verbosity_error()  # "newly initialized head" warnings are expected here
    hf_logging.disable_progress_bar()
    kwargs: dict[str, Any] = dict(dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code,
                                  attn_implementation=attention.ATTENTION_NAME)
    if task_type == "causal_lm":
        config = _load(AutoConfig, reference, revision, gguf_file, trust_remote_code=trust_remote_code)
        if config.is_encoder_decoder or not _is_decoder_config(config):
            raise UserError(f"{reference!r} is a {config.model_type} model, which does not generate text left to "
                            "right: task.type: causal_lm needs a decoder-only model (GPT-2, Llama, Qwen, SmolLM, "
                            "Gemma, ...). Use task.type: sequence_classification with this model.")
        try:
            return _load(AutoModelForCausalLM, reference, revision, gguf_file, **kwargs)
        except ValueError as err:
            raise UserError(f"{reference!r} has no causal language-model class ({err}).") from None
    if pooling == "model":
        kwargs.update(num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                      label2id={name: i for i, name in enumerate(label_names)})
        try:
            return _load(AutoModelForSequenceClassification, reference, revision, gguf_file, **kwargs)
        except ValueError as err:  # an architecture without a sequence-classification class
            raise UserError(f"{reference!r} has no sequence-classification head ({err}). "
                            "Use task.pooling: mean, which adds a head of its own.") from None
    return _load(AutoModel, reference, revision, gguf_file, **kwargs)  # mean / pair_mean: a head of our own


def enable_checkpointing(base: nn.Module) -> None:
    """Activation checkpointing, non-reentrant: it needs no input that requires grad, and replays the
    forward arguments (the prefix reaches the attention layers as one, not as a cache)."""
    if hasattr(base, "activation_checkpointing_enable"):  # the current name; where it exists, the older one warns
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def model_head(base: nn.Module) -> tuple[str, nn.Module]:
    """The name and module of the base model's own classification head (task.pooling: model)."""
    heads = [name for name in HEAD_MODULE_NAMES if isinstance(getattr(base, name, None), nn.Module)]
    if len(heads) != 1:
        raise UserError(f"{type(base).__name__} has no single classifier/score head ({heads}). "
                        "Use task.pooling: mean, which adds a head of its own.")
    return heads[0], getattr(base, heads[0])


def is_prepared(base: nn.Module) -> bool:
    """Whether `prepare_frozen` has made this base model ready for soft prompts."""
    return getattr(base, PREPARED_MARK, False)


def _keep_head_input(head: nn.Module, args: tuple) -> None:
    head.softprompt_input = args[0]


def _prepare_tokenizer(tokenizer, base: nn.Module, causal_lm: bool) -> None:
    if causal_lm and tokenizer.eos_token_id is None:  # free-form targets end with it; generation stops there
        eos = base.config.eos_token_id
        eos = eos[0] if isinstance(eos, list) else eos
        if eos is None:
            raise UserError("the model and its tokenizer define no end-of-sequence token, which causal_lm needs "
                            "(targets end with it). Set eos_token in the tokenizer files.")
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    if causal_lm:  # generation appends to every row at once: pad on the left
        tokenizer.padding_side = "left"
    elif not is_decoder(base):  # encoders read [CLS] at index 0 and take positions from the index
        tokenizer.padding_side = "right"


def prepare_frozen(base: nn.Module, tokenizer, task_type: str = "sequence_classification",
                   pooling: str = "model", gradient_checkpointing: bool = False) -> None:
    """Make a freshly loaded base model and tokenizer ready for soft prompts, once: freeze the model (all but
    its own head with task.pooling: model), let the head's input be read, give decoders a pad token id, and
    pad as the task needs. Idempotent."""
    causal_lm = task_type == "causal_lm"
    if is_decoder(base) and getattr(base.config, "pad_token_id", None) is None:
        base.config.pad_token_id = tokenizer.pad_token_id
    _prepare_tokenizer(tokenizer, base, causal_lm)
    base.requires_grad_(False)
    use_fast_dropout(base)
    if pooling == "model" and not causal_lm:
        _, head = model_head(base)
        head.requires_grad_(True)
        if not is_decoder(base) and not hasattr(head, "softprompt_input"):
            head.softprompt_input = None
            head.register_forward_pre_hook(_keep_head_input)
            # the head reads [CLS] alone: the last layer need not compute the other tokens
            enable_first_token_only(base)
    if is_decoder(base):
        enable_read_tail(base)  # a decoder's loss and scores read the last columns alone
    if gradient_checkpointing:
        enable_checkpointing(base)
    setattr(base, PREPARED_MARK, True)
