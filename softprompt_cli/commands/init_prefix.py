"""`softprompt init-prefix-from-text`: a prefix-tuning checkpoint made of the keys and values a text leaves in
the frozen model."""

from __future__ import annotations

from pathlib import Path

from softprompt_cli.artifacts.checkpoint import WEIGHTS_FILE, refuse_earlier_output, write_prefix_checkpoint
from softprompt_cli.errors import UserError
from softprompt_cli.model.loading import config_fingerprint, load_base_model, load_tokenizer
from softprompt_cli.model.prefix_capture import prefix_from_ids, text_token_ids


def init_prefix_from_text(model_name: str, text: str, num_virtual_tokens: int, out: Path, revision: str | None = None,
                          chat_template: bool = False, overwrite: bool = False, gguf_file: str | None = None
                          ) -> tuple[int, int]:
    """Write a prefix-tuning checkpoint from `text`; return (tokens in the text, bytes written)."""
    refuse_earlier_output(out, overwrite, "Choose another -o, or pass --overwrite.")
    if not text.strip():
        raise UserError("the text is empty. Give a text of at least --num-virtual-tokens tokens.")
    try:
        tokenizer = load_tokenizer(model_name, revision, gguf_file=gguf_file)
    except UserError as err:
        raise UserError(f"{model_name!r} has no usable tokenizer ({err})") from None
    base = load_base_model(model_name, revision=revision, dtype="float32", trust_remote_code=False, pooling="mean",
                           label_names=[], gguf_file=gguf_file)
    ids = text_token_ids(tokenizer, text, chat_template)
    prefix = prefix_from_ids(base, ids, num_virtual_tokens)
    write_prefix_checkpoint(out, prefix, model_name, revision, config_fingerprint(base.config), text)
    return len(ids), (out / WEIGHTS_FILE).stat().st_size
