"""Request bodies (pydantic; unknown fields are refused by name rather than silently ignored) and the
OpenAI-compatible response shapes."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_STOP_STRINGS = 4


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _unicode_text(cls, data: Any) -> Any:
        """JSON may carry lone surrogates ("\\ud800"), which no tokenizer takes and no answer can echo as UTF-8."""
        surrogate = _lone_surrogate(data)
        if surrogate is not None:
            raise ValueError(f"a text holds an unpaired surrogate ({surrogate.encode('unicode_escape').decode()}), "
                             "which is not Unicode text; send valid UTF-8")
        return data


def _lone_surrogate(data: Any) -> str | None:
    if isinstance(data, str):
        return next((c for c in data if "\ud800" <= c <= "\udfff"), None)
    values = data.values() if isinstance(data, dict) else data if isinstance(data, list) else ()
    return next((found for value in values if (found := _lone_surrogate(value)) is not None), None)


class _Sampled(_Body):
    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # what torch.Generator.manual_seed takes
    user: str | None = None

    @property
    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class StreamOptions(_Body):
    include_usage: bool = False


class CompletionRequest(_Sampled):
    prompt: str | list[str]
    max_tokens: int | None = Field(None, ge=1)
    """None: OpenAI's default for completions, 16."""

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(_Sampled):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @property
    def token_limit(self) -> int | None:
        """None (not given): as many as the server's limit and the model's positions allow, as OpenAI's chat."""
        return self.max_completion_tokens or self.max_tokens


class ClassifyRequest(_Body):
    model: str
    input: list[str | list[str]] = Field(min_length=1)


class LoadRequest(_Body):
    path: str
    name: str | None = None


class UnloadRequest(_Body):
    name: str


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error shape, which its client turns into its exceptions."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(chat: bool, ident: str, model: str, text: str | None, finish_reason: str | None,
                    first: bool = False, final: bool = True) -> dict:
    """A whole answer (final) or one streamed chunk of a completion or chat completion."""
    if chat:
        if final:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
        else:
            delta = {"role": "assistant", "content": text or ""} if first else \
                ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        kind = "chat.completion" if final else "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        kind = "text_completion"
    return {"id": ident, "object": kind, "created": int(time.time()), "model": model, "choices": [choice]}
