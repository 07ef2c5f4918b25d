"""The HTTP side: an OpenAI-compatible FastAPI application over an Engine, made by `create_app`.

    POST /v1/chat/completions   the conversation answered from retrieved documents; answer plus `clara.documents`
    POST /v1/retrieve           {"question", "k"} -> the ranked documents with their scores
    GET  /v1/models, /health    the served model's names; the engine's counters
    GET  /                      the page to try it (clara/serving/page.html)

A conversation reaches the generator as the model was trained to read it, with the client's parts around it:
the trained system text with the client's system (and developer) messages appended after a newline, the earlier
user and assistant turns, then the trained `Background ... Question:` turn holding the last user message. Retrieval
reads the last user message only: the question as the client last put it, which is also what the query reasoner
was trained on (one question, no dialogue). When the prompt would reach MAX_LEN the oldest turns are left out and
`clara.dropped_turns` says how many; a request with `"debug": true` also gets `clara.prompt`, the generator's
prompt as text.

Every error is an OpenAI-style JSON body with a 4xx (the request's fault) or 500 status. Requests are
parsed here (not by FastAPI's body models) so that malformed JSON, an oversized body and each invalid
field get their own message. Nothing a request carries is used as a path: `model` is only compared with
the served names.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from clara.model.decoding import RowDecoding, Sampling
from clara.openai_protocol import (
    SSE_DONE,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    ChunkChoice,
    Delta,
    OpenAIError,
    Usage,
    error_body,
    error_type_for,
    sse_event,
)
from clara.serving.engine import Engine, Job

SNIPPET_CHARS = 300  # of each document's text in a chat completion's `clara.documents`
OPEN_PATHS = ("/",)  # the page holds no data; what it asks for carries the key


@dataclass
class Limits:
    """What a request may ask for. default_k None: the checkpoint's generation_top_k."""

    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    default_k: int | None = None
    max_k: int = 64
    default_max_tokens: int = 64
    max_tokens: int = 1024


class ServeChatRequest(ChatCompletionRequest):
    """The OpenAI request plus this server's own fields (clients send them in `extra_body`)."""

    k: int | None = None  # how many documents to retrieve and return (the generator reads generation_top_k)
    min_tokens: int = Field(0, ge=0)  # no end token before this many answer tokens (as vLLM)
    debug: bool = False  # the response's `clara.prompt`: the prompt the generator read, as text


class RetrieveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str
    k: int | None = None
    model: str | None = None


class ClaraChatCompletion(ChatCompletion):
    clara: dict


class ClaraChunk(ChatCompletionChunk):
    clara: dict | None = None


class RequireKey:
    """ASGI middleware: with an API key, each request but the page has `Authorization: Bearer KEY` (constant time)."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given.removeprefix(b"Bearer "), self.key):
                body = error_body(
                    "a valid API key is needed: Authorization: Bearer KEY",
                    "authentication_error",
                    code="invalid_api_key",
                )
                await JSONResponse(body, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def read_json(request: Request, limit: int) -> dict:
    """The request's JSON object; 413 past `limit` bytes (the body is not read further), 400 if not JSON."""
    too_big = OpenAIError(413, f"the request body is over {limit} bytes", code="request_too_large")
    if int(request.headers.get("content-length") or 0) > limit:
        raise too_big
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise too_big
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise OpenAIError(400, f"the request body is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(value, dict):
        raise OpenAIError(
            400, f"the request body must be a JSON object, got {type(value).__name__}", code="invalid_json"
        )
    return value


def parse(model: type[BaseModel], value: dict) -> BaseModel:
    try:
        return model.model_validate(value)
    except ValidationError as error:
        raise OpenAIError.from_validation(error) from None


# CLaRa's own tokens in a client's text would be read as memory slots; they are not text, so they are taken out.
CLARA_TOKENS = re.compile(r"<MEM\d+>|<AE>|<ENC>|<SEP>")
SYSTEM_ROLES = ("system", "developer")


@dataclass
class Conversation:
    question: str  # the last user message: retrieval reads it, and the trained `Question:` turn holds it
    system: str  # the client's system and developer messages, joined by newlines
    turns: list[dict]  # the user and assistant messages before the question, oldest first


def client_text(message: ChatMessage) -> str:
    return CLARA_TOKENS.sub("", message.content or "").strip()


def conversation(messages: list[ChatMessage]) -> Conversation:
    """The request's messages as the server reads them (not tool messages, nor what follows the last user one)."""
    last = max((i for i, m in enumerate(messages) if m.role == "user"), default=None)
    question = client_text(messages[last]) if last is not None else ""
    if not question:
        raise OpenAIError(
            400,
            "messages: the last user message (the question) is missing or empty",
            param="messages",
            code="invalid_value",
        )
    system = "\n".join(text for m in messages if m.role in SYSTEM_ROLES and (text := client_text(m)))
    turns = [
        {"role": m.role, "content": text}
        for m in messages[:last]
        if m.role in ("user", "assistant") and (text := client_text(m))
    ]
    return Conversation(question, system, turns)


def sampling(request: ServeChatRequest, limits: Limits) -> Sampling:
    tokens = request.token_limit() or limits.default_max_tokens
    if tokens > limits.max_tokens:
        raise OpenAIError(
            400,
            f"max_tokens={tokens}: this server answers with at most {limits.max_tokens} tokens",
            param="max_tokens",
            code="invalid_value",
        )
    stops = request.stop_strings()
    if len(stops) > 4 or not all(stops):
        raise OpenAIError(400, "stop: expected up to 4 non-empty strings", param="stop", code="invalid_value")
    return Sampling(
        tokens,
        request.temperature or 0.0,
        1.0 if request.top_p is None else request.top_p,
        request.seed,
        tuple(stops),
        min(request.min_tokens, tokens),
    )


async def next_event(job: Job, kind: str):
    """The job's next event, which must be `kind`; an error event raises its OpenAIError."""
    got, value = await job.events.get()
    if got == "error":
        raise value
    if got != kind:
        raise OpenAIError(500, f"the engine sent {got!r} where {kind!r} was due", "server_error")
    return value


def create_app(engine: Engine, limits: Limits) -> FastAPI:
    """The application; it starts the engine's thread when served and stops it at shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="CLaRa", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.limits = engine, limits
    app.state.page = resources.files("clara.serving").joinpath("page.html").read_text(encoding="utf-8")
    if limits.api_key:
        app.add_middleware(RequireKey, api_key=limits.api_key)
    app.add_exception_handler(OpenAIError, openai_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_api_route("/", home, methods=["GET"], response_class=HTMLResponse)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/v1/retrieve", retrieve, methods=["POST"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    return app


# -- errors --------------------------------------------------------------------------------------------------
async def openai_error(request: Request, error: OpenAIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


async def http_error(request: Request, error: HTTPException) -> JSONResponse:
    """Unknown paths (404) and methods (405), in the OpenAI error shape."""
    return JSONResponse(
        error_body(f"{request.method} {request.url.path}: {error.detail}", error_type_for(error.status_code)),
        status_code=error.status_code,
    )


async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    return JSONResponse(error_body(str(error.errors()[0].get("msg"))), status_code=400)


def check_model(engine: Engine, name: str | None) -> None:
    if name is not None and name not in engine.model_names:
        served = ", ".join(repr(n) for n in engine.model_names)
        raise OpenAIError(
            404,
            f"model {name!r} is not served here; this server serves {served}",
            param="model",
            code="model_not_found",
        )


def check_k(engine: Engine, limits: Limits, k: int | None, smallest: int) -> int:
    k = k if k is not None else (limits.default_k or engine.top_k)
    documents = engine.index.documents
    largest = min(limits.max_k, documents)
    if not smallest <= k <= largest:
        raise OpenAIError(
            400,
            f"k={k}: expected {smallest} to {largest} (the generator reads {engine.top_k} "
            f"documents; the index holds {documents})",
            param="k",
            code="invalid_value",
        )
    return k


# -- routes --------------------------------------------------------------------------------------------------
async def home(request: Request) -> HTMLResponse:
    return HTMLResponse(request.app.state.page)


async def health(request: Request) -> dict:
    engine = request.app.state.engine
    return {
        "status": "ok",
        "engine": engine.kind,
        "model": engine.model_name,
        "documents": engine.index.documents,
        "index_generation": engine.index.generation,
        "generation_top_k": engine.top_k,
        "max_batch": engine.max_batch,
        "max_wait_ms": engine.max_wait * 1000,
        "window_tokens": engine.window_tokens,
        "queued": engine.queued(),
        **asdict(engine.counters),
    }


async def models(request: Request) -> dict:
    names = request.app.state.engine.model_names
    return {
        "object": "list",
        "data": [{"id": name, "object": "model", "created": 0, "owned_by": "clara"} for name in names],
    }


async def retrieve(request: Request) -> dict:
    engine, limits = request.app.state.engine, request.app.state.limits
    body = parse(RetrieveRequest, await read_json(request, limits.max_body_bytes))
    check_model(engine, body.model)
    if not body.question.strip():
        raise OpenAIError(400, "question: expected a non-empty string", param="question", code="invalid_value")
    k = check_k(engine, limits, body.k, 1)
    job = engine.submit(Job(body.question.strip(), k, None, asyncio.get_running_loop()))
    return {"object": "list", "model": engine.model_name, "data": await next_event(job, "retrieved")}


async def chat_completions(request: Request):
    engine, limits = request.app.state.engine, request.app.state.limits
    body = parse(ServeChatRequest, await read_json(request, limits.max_body_bytes))
    check_model(engine, body.model)
    chat, k = conversation(body.messages), check_k(engine, limits, body.k, engine.top_k)
    job = Job(chat.question, k, RowDecoding(sampling(body, limits)), asyncio.get_running_loop())
    job.system, job.turns, job.debug = chat.system, chat.turns, body.debug
    job.row.on_text = lambda piece: job.send("text", piece)
    engine.submit(job)
    try:
        documents = await next_event(job, "retrieved")
    except BaseException:
        job.cancel()
        raise
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
    clara = {
        "k": k,
        "generator_read": engine.top_k,
        "documents": [{**d, "text": d["text"][:SNIPPET_CHARS]} for d in documents],
        "dropped_turns": job.dropped_turns,  # earlier turns left out (oldest first) to fit MAX_LEN
    }
    if body.debug:
        clara["prompt"] = job.prompt_text
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(
            stream(job, head, clara, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    try:
        while (event := await job.events.get())[0] == "text":
            pass
    finally:
        job.cancel()
    if event[0] == "error":
        raise event[1]
    message = ChatMessage(role="assistant", content=event[1]["text"])
    return ClaraChatCompletion(
        **head,
        choices=[Choice(message=message, finish_reason=finish_reason(event[1]))],
        usage=usage(event[1]),
        clara=clara,
    ).model_dump(exclude_none=True)


def finish_reason(done: dict) -> str:
    return "length" if done.get("finish_reason") == "length" else "stop"


def usage(done: dict) -> Usage:
    prompt, completion = done.get("prompt_tokens", 0), done.get("completion_tokens", 0)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def stream(job: Job, head: dict, clara: dict, include_usage: bool):
    """Server-sent events as OpenAI streams them: the role (with the documents), the pieces, the finish
    reason, optionally the usage, then [DONE]. A client that goes away cancels its answer's decoding."""

    def chunk(**fields) -> str:
        return sse_event(ClaraChunk(**head, **fields))

    try:
        yield chunk(choices=[ChunkChoice(delta=Delta(role="assistant", content=""))], clara=clara)
        while True:
            kind, value = await job.events.get()
            if kind == "text":
                yield chunk(choices=[ChunkChoice(delta=Delta(content=value))])
            elif kind == "error":
                yield f"data: {json.dumps(value.body())}\n\n"
                return
            else:
                yield chunk(choices=[ChunkChoice(delta=Delta(), finish_reason=finish_reason(value))])
                if include_usage:
                    yield chunk(choices=[], usage=usage(value))
                yield SSE_DONE
                return
    finally:
        job.cancel()
