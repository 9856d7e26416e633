"""The OpenAI request and response shapes for `/v1/completions` and `/v1/chat/completions`.

Requests are validated here, field by field, so a client gets a 422 naming the field it got wrong.
Fields that do not change the answer (`user`, `metadata`, `store`, ...) are accepted and ignored, as
other OpenAI-compatible servers do; fields that would change it and that we cannot honour (`logprobs`,
`tools`, penalties other than 0, ...) are refused by name rather than silently dropped.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from forgeml.serve.decoding import Piece

# Fields of the OpenAI API that we accept only at the value that means "off", with what to say otherwise.
UNSUPPORTED_UNLESS_OFF = {
    "logprobs": "log-probabilities are not returned",
    "top_logprobs": "log-probabilities are not returned",
    "echo": "the prompt is not echoed",
    "suffix": "insertion (a suffix) is not supported",
    "logit_bias": "logit_bias is not supported",
    "presence_penalty": "presence_penalty other than 0 is not supported",
    "frequency_penalty": "frequency_penalty other than 0 is not supported",
    "tools": "tool calls are not supported",
    "functions": "function calls are not supported",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
}
OFF_VALUES: tuple[Any, ...] = (None, False, 0, 0.0, {}, [], "none", "auto", "text")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. `name`
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        """The message's text; content parts are joined (only text parts are understood)."""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"content part of type {part.get('type')!r}: only text parts are supported")
            texts.append(part["text"])
        return "".join(texts)


class _Sampling(BaseModel):
    """What completions and chat requests share."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(..., min_length=1, max_length=200)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, validate_default=True)  # always a list once validated
    seed: int | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> list[str]:
        stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    def refused_fields(self) -> list[tuple[str, str]]:
        """(field, why) for each field set to something we cannot honour."""
        extra = self.model_extra or {}
        return [
            (name, why)
            for name, why in UNSUPPORTED_UNLESS_OFF.items()
            if name in extra and not any(extra[name] == off and type(extra[name]) is type(off) for off in OFF_VALUES)
        ]


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    best_of: int | None = Field(None, ge=1)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: dict[str, Any] | None = None
    tool_choice: Any = None


def openai_error(message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict[str, Any]:
    """OpenAI's error body."""
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


class CompletionWriter:
    """Builds the response bodies (whole or as Server-Sent Events) of one completions or chat request."""

    def __init__(self, chat: bool, response_id: str, model: str):
        self.chat, self.id, self.model = chat, response_id, model
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def response(self, texts: list[str], finishes: list[str], usage: dict[str, int]) -> dict[str, Any]:
        choices = []
        for index, (text, finish) in enumerate(zip(texts, finishes, strict=True)):
            if self.chat:
                choice = {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None}
            else:
                choice = {"index": index, "text": text, "logprobs": None}
            choices.append({**choice, "finish_reason": finish})
        return {**self._head(self.object), "choices": choices, "usage": usage}

    def first_chunks(self, choices: int) -> list[str]:
        """Chat streams open each choice with its role, as OpenAI's do."""
        if not self.chat:
            return []
        return [self._chunk(index, {"role": "assistant", "content": ""}, None) for index in range(choices)]

    def chunk(self, piece: Piece) -> str:
        content = {"content": piece.text} if piece.text or not piece.finish_reason else {}
        delta: Any = content if self.chat else piece.text
        return self._chunk(piece.choice, delta, piece.finish_reason)

    def usage_chunk(self, usage: dict[str, int]) -> str:
        return _event({**self._head(self._chunk_object), "choices": [], "usage": usage})

    @staticmethod
    def done() -> str:
        return "data: [DONE]\n\n"

    @property
    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _chunk(self, index: int, delta: Any, finish: str | None) -> str:
        if self.chat:
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": delta, "logprobs": None, "finish_reason": finish}
        return _event({**self._head(self._chunk_object), "choices": [choice]})

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
