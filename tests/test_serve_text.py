"""The server's text stream: what each generated token lets out, checked against the whole text decoded at once.
Tokens here are single bytes, so a multi-byte character arrives in pieces, as with byte-level BPE tokenizers."""

from __future__ import annotations

import pytest

from softprompt_cli.serving.text import TextStream

EOS = 256


class ByteTokenizer:
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i != EOS).decode("utf-8", errors="replace")


def stream_out(text: str, stop: list[str], max_tokens: int = 1000) -> tuple[list[str], str | None]:
    stream = TextStream(ByteTokenizer(), (EOS,), stop, max_tokens)
    deltas = []
    for token in [*text.encode("utf-8"), EOS]:
        deltas.append(stream.accept(token))
        if stream.finish_reason is not None:
            break
    return deltas, stream.finish_reason


@pytest.mark.parametrize("text,stop,expected", [
    ("hello A\N{GRINNING FACE} more text", ["A\N{GRINNING FACE}"], "hello "),
    ("hello A\N{GRINNING FACE} more text", ["\N{GRINNING FACE} m"], "hello A"),
    ("caf\N{LATIN SMALL LETTER E WITH ACUTE} au lait. Next", [". N"], "caf\N{LATIN SMALL LETTER E WITH ACUTE} au lait"),
    ("no stop \N{GRINNING FACE} here", ["xyz"], "no stop \N{GRINNING FACE} here"),
    ("\N{GRINNING FACE}\N{GRINNING FACE}", ["\N{GRINNING FACE}\N{GRINNING FACE}"], ""),
])
def test_stop_strings_never_leak_and_characters_arrive_whole(text, stop, expected):
    deltas, reason = stream_out(text, stop)
    assert "".join(deltas) == expected
    assert reason == "stop"
    assert all("\ufffd" not in delta for delta in deltas)  # half a character is never given out


def test_max_tokens_ends_the_row_with_what_is_certain():
    deltas, reason = stream_out("abc\N{GRINNING FACE}", [], max_tokens=5)  # 3 letters + half the emoji
    assert reason == "length" and "".join(deltas) == "abc"


def _metaspace_tokenizer():
    """A SentencePiece-style tokenizer (Llama-2, Mistral, Gemma): '▁' marks a word's leading space, and the
    decoder drops the space at a text's start."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "</s>", "▁Review:", "▁a", "▁fine", "▁film", "▁positive", "▁film.", "."]
    vocab = {word: index for index, word in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")


def _wordpiece_tokenizer():
    from transformers import AutoTokenizer

    from softprompt_cli.hub import packaged_model_path

    return AutoTokenizer.from_pretrained(packaged_model_path("sentence-transformers/all-MiniLM-L6-v2"))


@pytest.mark.parametrize("make", [_metaspace_tokenizer, _wordpiece_tokenizer], ids=["sentencepiece", "wordpiece"])
def test_a_continuation_keeps_the_space_before_its_first_word(make):
    """prompt text + continuation == the text of prompt + continuation tokens: a continuation decoded alone lost
    its leading space (' positive' -> 'positive'); streamed, token by token, the same."""
    from softprompt_cli.model.lm import continuation_text

    tokenizer = make()
    prompt = tokenizer("Review: a fine film", add_special_tokens=False)["input_ids"]
    new = tokenizer(" positive film.", add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in prompt + new
    whole = tokenizer.decode(prompt + new, skip_special_tokens=True)
    text = continuation_text(tokenizer, prompt, new)
    assert tokenizer.decode(prompt, skip_special_tokens=True) + text == whole
    assert text.startswith(" positive")
    stream = TextStream(tokenizer, (tokenizer.eos_token_id,), [], 100, prompt)
    assert "".join(stream.accept(token) for token in [*new, tokenizer.eos_token_id]) == text


def test_every_end_token_ends_the_text_and_is_not_part_of_it():
    end_of_turn = 257
    stream = TextStream(ByteTokenizer(), (EOS, end_of_turn), [], 100)
    assert [stream.accept(token) for token in [*b"ok", end_of_turn]] == ["o", "k", ""]
    assert stream.finish_reason == "stop" and stream.tokens == list(b"ok")
