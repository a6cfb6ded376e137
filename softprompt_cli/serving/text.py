"""Generated tokens to text, as a stream: each new token gives the text that is now certain (not the start of a
stop string, not half a character), and the reason the row finished, if it did."""

from __future__ import annotations

from dataclasses import dataclass, field

from softprompt_cli.model import lm

INCOMPLETE_CHARACTER = "\ufffd"
"""What a tokenizer decodes half of a multi-byte character to: held back until the rest arrives."""


@dataclass
class TextStream:
    tokenizer: object
    stop_ids: tuple[int, ...]
    """Tokens that end the text (lm.stop_token_ids): not part of it."""
    stop: list[str] = field(default_factory=list)
    max_tokens: int = 16
    prompt_ids: list[int] = field(default_factory=list)
    """The prompt: the text is what the tokens add after it (see lm.continuation_text)."""
    tokens: list[int] = field(default_factory=list)
    sent: int = 0
    """Characters of the text already given out."""
    finish_reason: str | None = None

    def __post_init__(self) -> None:
        self.prompt_ids = list(self.prompt_ids[-lm.PROMPT_CONTEXT_TOKENS:])
        self._head = self.tokenizer.decode(self.prompt_ids, skip_special_tokens=True)

    def _held_back(self, text: str) -> int:
        """Characters at the end of `text` that may still change: half a character, and the start of a stop
        string before it (the half character may complete the stop string)."""
        incomplete = len(text) - len(text.rstrip(INCOMPLETE_CHARACTER))
        whole = text[:len(text) - incomplete]
        return incomplete + max((size for stop in self.stop for size in range(min(len(stop) - 1, len(whole)), 0, -1)
                                 if whole.endswith(stop[:size])), default=0)

    def accept(self, token: int) -> str:
        """Take one generated token: the text it adds (possibly empty); `finish_reason` is set once the row is
        done ("stop": an end token or a stop string, "length": max_tokens)."""
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return self._flush(self._text())
        self.tokens.append(token)
        text = self._text()
        ends = [text.find(stop, max(0, self.sent - len(stop) + 1)) for stop in self.stop]
        ends = [end for end in ends if end >= 0]
        if ends:
            self.finish_reason = "stop"
            return self._flush(text[:min(ends)])
        if len(self.tokens) >= self.max_tokens:
            self.finish_reason = "length"
            return self._flush(text)
        certain = len(text) - self._held_back(text)
        delta = text[self.sent:certain] if certain > self.sent else ""
        self.sent = max(self.sent, certain)
        return delta

    def _text(self) -> str:
        return lm.continuation_text(self.tokenizer, self.prompt_ids, self.tokens, self._head)

    def _flush(self, text: str) -> str:
        delta = text[self.sent:]
        self.sent = len(text)
        return delta.removesuffix(INCOMPLETE_CHARACTER)
