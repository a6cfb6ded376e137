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
    stream = TextStream(ByteTokenizer(), EOS, stop, max_tokens)
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
