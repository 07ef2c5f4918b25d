"""The OpenAI chat-completions protocol, as far as this project speaks it: request, response, streamed chunk,
error body and the error classification a client acts on.

Both sides of the one HTTP stack import it: the server (`clara.serving`, `python -m clara.serve`) validates
requests and writes responses with these models, and the synthesis client (`clara.synthesis`) builds requests
and reads responses and errors with them. Pure pydantic and the standard library, no web framework, so that
either side imports it without the other's dependencies.

Requests are strict (an unknown field is a 400, as the issue asks of the server); responses are lenient
(real OpenAI-compatible servers add fields such as `system_fingerprint`, which a client must ignore).
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ChatMessage(_Lenient):
    """One message of a conversation; only text content is supported."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | None = None


class ChatCompletionRequest(_Strict):
    """`POST /v1/chat/completions`. `temperature` 0 (or None, the server's default) is greedy; above 0 samples
    with `top_p`, reproducibly for a given `seed`. `n` is accepted only as 1 (clients such as LangChain send it).
    `response_format` is passed through for servers that honour it (this project's server ignores it)."""

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    response_format: dict | None = None
    n: int = Field(1, ge=1, le=1)
    user: str | None = None

    def stop_strings(self) -> list[str]:
        """`stop` as a list (OpenAI accepts one string or up to four)."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def token_limit(self) -> int | None:
        """`max_completion_tokens` (the newer name) or `max_tokens`."""
        return self.max_completion_tokens or self.max_tokens


class Usage(_Lenient):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Choice(_Lenient):
    index: int = 0
    message: ChatMessage
    finish_reason: Literal["stop", "length", "content_filter", "tool_calls"] | None = "stop"


class ChatCompletion(_Lenient):
    """The response of a non-streamed chat completion."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None = None


class Delta(_Lenient):
    role: str | None = None
    content: str | None = None


class ChunkChoice(_Lenient):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length", "content_filter", "tool_calls"] | None = None


class ChatCompletionChunk(_Lenient):
    """One server-sent event of a streamed chat completion; the stream ends with `data: [DONE]`."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


SSE_DONE = "data: [DONE]\n\n"


def sse_event(payload: BaseModel) -> str:
    """One server-sent event carrying `payload` as JSON, as OpenAI streams it."""
    return f"data: {payload.model_dump_json(exclude_none=True)}\n\n"


# The error `type` OpenAI gives each status, used when a caller names none.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def error_type_for(status: int) -> str:
    return ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(
    message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    """The JSON body of an OpenAI-style error: `{"error": {"message", "type", "param", "code"}}`."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class OpenAIError(Exception):
    """An HTTP error in the OpenAI style. A server raises it to answer `status` with `body()`; a client gets it
    from `OpenAIError.from_response` and asks `retryable` whether another try can succeed."""

    def __init__(
        self, status: int, message: str, type: str | None = None, param: str | None = None, code: str | None = None
    ):
        self.status, self.message = status, message
        self.type, self.param, self.code = type or error_type_for(status), param, code
        super().__init__(f"HTTP {status} {self.type}: {message}")

    @property
    def retryable(self) -> bool:
        """Rate limits (429) and server errors (5xx) may pass; any other status (400, 401, 403, 404, ...)
        will fail again the same way, so a client stops."""
        return self.status == 429 or self.status >= 500

    @property
    def fatal(self) -> bool:
        return not self.retryable

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    @classmethod
    def from_response(cls, status: int, text: str | bytes) -> OpenAIError:
        """Read an error response; a body that is not an OpenAI error (a proxy's HTML page) is kept as text."""
        try:
            error = json.loads(text)["error"]
            return cls(status, str(error.get("message", "")), error.get("type"), error.get("param"), error.get("code"))
        except (ValueError, KeyError, TypeError, AttributeError):
            raw = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
            return cls(status, raw[:500].strip() or f"HTTP {status}")

    @classmethod
    def from_validation(cls, exc: ValidationError) -> OpenAIError:
        """A 400 naming the first invalid field (as `param`) and what was wrong with it."""
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        message = f"{param}: {first['msg']}" if param else first["msg"]
        return cls(400, message, "invalid_request_error", param, first["type"])
