"""The LLM a synthesis run asks, behind one interface: `await llm.chat(request) -> Reply`.

`--llm openai:URL` talks to any OpenAI-compatible server (vLLM, SGLang, llama.cpp's server, a hosted API) with
many requests in flight (aiohttp: httpx's connection pool cost more CPU per request than the 200 ms answers of
the test server left); `--llm hf:MODEL_OR_PATH` generates locally in batches (clara.synthesis.local). The request
and response bodies are the models of clara.openai_protocol, shared with this project's own server.

Transient failures (429, 5xx, a timeout, a dropped or refused connection) are retried with exponential backoff and
counted; a status that will not change on a retry (400, 401, 403, 404) stops the run with one line.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp
from pydantic import ValidationError

from clara.errors import ConfigError, RunFailure
from clara.openai_protocol import ChatCompletion, ChatCompletionRequest, OpenAIError
from clara.synthesis.recipe import response_format

LLM_KINDS = ("openai", "hf", "vllm")
MAX_BACKOFF_SECONDS = 60.0


@dataclass(frozen=True)
class ChatRequest:
    task: str  # a key of recipe.SCHEMAS: names the JSON asked for
    messages: list[dict]
    seed: int


@dataclass
class Reply:
    text: str | None  # None: the server's 200 was not a chat completion (counted as a malformed output)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retried: Counter = field(default_factory=Counter)  # reason ("429", "500", "timeout", "connection") -> tries


class LLM(Protocol):
    in_flight: int

    async def chat(self, request: ChatRequest) -> Reply: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class GenerationSettings:
    max_tokens: int
    temperature: float


def parse_llm_spec(spec: str) -> tuple[str, str]:
    """`openai:URL`, `hf:MODEL_OR_PATH` or `vllm:MODEL` (a vLLM server this run starts, clara.vllm_server)
    -> (kind, target); ConfigError for anything else."""
    kind, _, target = spec.partition(":")
    if kind not in LLM_KINDS or not target:
        raise ConfigError("llm", spec, "openai:http://HOST:PORT/v1, hf:MODEL_OR_PATH or vllm:MODEL")
    if kind == "openai" and not target.startswith(("http://", "https://")):
        raise ConfigError("llm", spec, "openai: and the server's base URL, e.g. openai:http://localhost:8000/v1")
    return kind, target


def _fatal(error: OpenAIError, base_url: str, model: str) -> ConfigError:
    """A status a retry cannot change, as the setting the user has to fix."""
    said = f"the server answered {error}"
    if error.status in (401, 403):
        return ConfigError("llm", base_url, f"a server that accepts the key in OPENAI_API_KEY ({said})")
    if error.status == 404:
        return ConfigError("model", model, f"a model served at {base_url}/chat/completions ({said})")
    return ConfigError("llm", base_url, f"a server that accepts these requests ({said})")


class OpenAIChat:
    """Chat completions from an OpenAI-compatible server, at most `concurrency` requests in flight."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None,
        settings: GenerationSettings,
        concurrency: int,
        timeout: float,
        max_retries: int,
        backoff: float,
    ):
        self.url, self.model, self.settings = base_url.rstrip("/"), model, settings
        self.concurrency, self.timeout, self.max_retries, self.backoff = concurrency, timeout, max_retries, backoff
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.session: aiohttp.ClientSession | None = None  # made in the event loop that uses it
        self.slots = asyncio.Semaphore(concurrency)
        self.in_flight = 0

    def _body(self, request: ChatRequest) -> dict:
        body = ChatCompletionRequest(
            model=self.model,
            messages=request.messages,
            seed=request.seed,
            max_tokens=self.settings.max_tokens,
            temperature=self.settings.temperature,
            response_format=response_format(request.task),
        )
        return body.model_dump(exclude_none=True, exclude_defaults=True)

    async def _post(self, body: dict) -> tuple[str | None, bytes, str]:
        """One try: (None or the reason to retry, status, body, Retry-After)."""
        if self.session is None:
            self.session = aiohttp.ClientSession(
                headers=self.headers,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                connector=aiohttp.TCPConnector(limit=self.concurrency),
            )
        async with self.slots:
            self.in_flight += 1
            try:
                async with self.session.post(f"{self.url}/chat/completions", json=body) as response:
                    status, content = response.status, await response.read()
                    retry_after = response.headers.get("Retry-After", "")
            except TimeoutError:
                return "timeout", b"", ""
            except aiohttp.ClientError:  # refused, reset or dropped connections, cut bodies
                return "connection", b"", ""
            finally:
                self.in_flight -= 1
        if status == 200:
            return None, content, retry_after
        error = OpenAIError.from_response(status, content)
        if error.fatal:
            raise _fatal(error, self.url, self.model)
        return str(status), content, retry_after

    def _delay(self, tries: int, retry_after: str) -> float:
        """Exponential backoff with jitter; a server's Retry-After (seconds) wins when it asks for longer."""
        delay = min(MAX_BACKOFF_SECONDS, self.backoff * 2**tries) * (0.5 + random.random() / 2)
        asked = min(float(retry_after), MAX_BACKOFF_SECONDS) if retry_after.replace(".", "", 1).isdigit() else 0.0
        return max(delay, asked)

    async def chat(self, request: ChatRequest) -> Reply:
        body = self._body(request)
        retried: Counter = Counter()
        for tries in range(self.max_retries + 1):
            reason, content, retry_after = await self._post(body)
            if reason is None:
                return _reply(content, retried)
            retried[reason] += 1
            if tries < self.max_retries:
                await asyncio.sleep(self._delay(tries, retry_after))
        raise RunFailure(
            f"{self.url}: no answer after {self.max_retries + 1} tries ({dict(retried)}); "
            "what was finished is kept: run the same command again to continue"
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


def _reply(content: bytes, retried: Counter) -> Reply:
    try:
        completion = ChatCompletion.model_validate_json(content)
    except ValidationError:
        return Reply(None, retried=retried)
    usage = completion.usage
    text = completion.choices[0].message.content if completion.choices else None
    return Reply(text, usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0, retried)
