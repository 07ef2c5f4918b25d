"""The vLLM engine (`clara serve --engine vllm`): clara retrieves, vLLM generates.

The engine thread does what it does for the hf engine up to the generator: admits the requests (the same 400s),
encodes their questions with the query reasoner, searches the index and builds each prompt. Then, instead of
decoding, it splices each request's stored memory vectors into its prompt's token embeddings and hands them to a
vLLM server (`prompt_embeds` on its Completions endpoint, a base64 `torch.save` tensor) that serves the generator
exported for it (clara.model.vllm_export). vLLM batches per token with its paged KV cache; the answer streams
back on the web side's event loop, one task per request, and a client that goes away cancels that task, which
closes the stream: vLLM aborts a request whose connection closes.

vLLM `torch.load`s the embeddings it is sent, so nothing but clara may reach it: the server clara starts
(clara.vllm_server) listens on the loopback address with a random key only clara knows.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import time
from collections.abc import Iterator

import httpx
import torch

from clara.errors import ConfigError, RunFailure
from clara.evaluation.inference import CLaRa
from clara.index.store import CorpusIndex
from clara.locks import holding
from clara.model.decoding import RowDecoding, emit
from clara.model.model import stop_token_ids
from clara.model.tiny_base import clara_home
from clara.model.vllm_export import export_fingerprint, vllm_fingerprint, write_vllm_export
from clara.openai_protocol import OpenAIError
from clara.serving.engine import Engine, Job
from clara.vllm_server import VLLMServer, VLLMStartError

SERVED_NAME = "clara-generator"  # the name clara asks vLLM for; clients see --model_name
# vLLM's CPU build: no thread pinning (the machine is shared with clara's own threads) and a small KV cache.
CPU_ENV_DEFAULTS = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1"}
# A generated CLaRa token (memory, <AE>, <ENC>, <SEP>) is kept out as the hf engine's suppress_tokens keeps it out;
# vLLM takes biases in [-100, 100].
SUPPRESS_BIAS = -100


def export_cache() -> str:
    """Where `clara serve --engine vllm` keeps its exports, one folder per generator fingerprint."""
    return os.path.join(clara_home(), "vllm-exports")


def prompt_embeds_b64(embeds: torch.Tensor) -> str:
    buffer = io.BytesIO()
    torch.save(embeds.detach().cpu().contiguous(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class VLLMEngine(Engine):
    """An Engine whose answers vLLM generates: `url` (…/v1) and `api_key` of a server that serves the export."""

    kind = "vllm"

    def __init__(
        self,
        clara: CLaRa,
        index: CorpusIndex,
        model_name: str | list[str],
        url: str,
        api_key: str | None,
        max_batch: int = 16,
        max_wait_ms: float = 10.0,
        max_len: int | None = None,
        seed: int = 42,
        read_timeout: float = 1800.0,
    ):
        super().__init__(clara, index, model_name, max_batch=max_batch, max_wait_ms=max_wait_ms, max_len=max_len)
        self.window_tokens = None  # vLLM schedules every token: no windows
        # Seconds vLLM may keep an answer waiting (its first piece, or the next): a hung vLLM fails the request.
        self.read_timeout = read_timeout
        self.url, self.api_key = url.rstrip("/"), api_key
        model = clara.model
        self.stop_ids = sorted(stop_token_ids(model.tokenizer))
        added = list(model.tokens.mem_ids) + [model.tokens.ae_id, model.tokens.enc_id, model.tokens.sep_id]
        self.bias = {str(token): SUPPRESS_BIAS for token in added}
        self.dtype = next(model.causal_lm.parameters()).dtype
        self._loop: asyncio.AbstractEventLoop | None = None
        self._http: httpx.AsyncClient | None = None

    def start(self) -> None:
        """Called on the web side's event loop (the app's lifespan): the HTTP client lives on it."""
        self._loop = asyncio.get_running_loop()
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        self._http = httpx.AsyncClient(
            headers=headers, timeout=httpx.Timeout(10.0, read=self.read_timeout), limits=limits, trust_env=False
        )
        super().start()

    def stop(self) -> None:
        super().stop()
        if self._http is not None:
            asyncio.run_coroutine_threadsafe(self._http.aclose(), self._loop).result(timeout=30)

    # -- the engine thread --------------------------------------------------------------------------------
    @torch.no_grad()
    def _step(self, active: list[Job], new: list[Job]) -> list[Job]:
        """Retrieve for the new jobs and hand each answer to vLLM; nothing stays active in this thread."""
        new = [job for job in new if self._admit(job)]
        if not new:
            return []
        self._retrieve(new)
        self.counters.batches += 1
        self.counters.largest_batch = max(self.counters.largest_batch, len(new))
        for job in new:
            if job.row is None:
                self._done(job)
            else:
                self._hand_over(job, self._embeds(job))
        return []

    def _embeds(self, job: Job) -> torch.Tensor:
        """The job's prompt embeddings [T, H], its documents' stored vectors at the memory positions."""
        model = self.clara.model
        vectors = self.index.memory(job.found).reshape(-1, model.hidden_size)
        ids = torch.tensor([job.prompt_ids], device=self.clara.device)
        job.prompt_tokens = len(job.prompt_ids)
        return model.inject(ids, vectors.to(self.clara.device))[0].to(self.dtype)

    def _hand_over(self, job: Job, embeds: torch.Tensor) -> None:
        sampling = job.row.sampling
        body = {
            "model": SERVED_NAME,
            "prompt_embeds": prompt_embeds_b64(embeds),
            "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "min_tokens": sampling.min_tokens,
            "stop": list(sampling.stop),
            "stop_token_ids": self.stop_ids,
            "logit_bias": self.bias,
            "skip_special_tokens": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        task = asyncio.run_coroutine_threadsafe(self._answer(job, body), self._loop)
        job.abort = task.cancel

    # -- the event loop -----------------------------------------------------------------------------------
    async def _answer(self, job: Job, body: dict) -> None:
        row = job.row
        try:
            if row.cancelled.is_set():
                raise asyncio.CancelledError
            await self._stream(job, body)
        except asyncio.CancelledError:
            row.finish_reason = "cancelled"
        except Exception as error:  # noqa: BLE001 - reported to the client as a 500, and the engine goes on
            self.counters.failed += 1
            job.send(
                "error", OpenAIError(500, f"vLLM failed answering: {type(error).__name__}: {error}", "server_error")
            )
            return
        self._done(job)

    async def _stream(self, job: Job, body: dict) -> None:
        """Follow vLLM's stream: the answer's text as RowWatch builds it (stripped, stop strings held back)."""
        row: RowDecoding = job.row
        hold = max((len(s) for s in row.sampling.stop), default=1) - 1
        raw = ""
        async with self._http.stream("POST", f"{self.url}/completions", json=body) as reply:
            if reply.status_code != 200:
                detail = (await reply.aread()).decode(errors="replace")[:500]
                raise ValueError(f"status {reply.status_code}: {detail}")
            async for line in reply.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                if chunk.get("usage"):
                    row.tokens = [0] * chunk["usage"]["completion_tokens"]  # the count is what is reported
                for choice in chunk.get("choices", []):
                    raw += choice.get("text") or ""
                    text = raw.strip()
                    row.text = text
                    if choice.get("finish_reason"):
                        row.finish_reason = "length" if choice["finish_reason"] == "length" else "stop"
                    else:
                        safe = text.rstrip("\ufffd")
                        emit(row, safe[: len(safe) - hold] if hold else safe)
        emit(row, row.text)
        if row.finish_reason is None:
            raise ValueError("the stream ended without a finish reason")


def generator_export(clara: CLaRa, vllm_model: str | None) -> tuple[str, str]:
    """The export vLLM serves and its fingerprint: `vllm_model` when given (refused when it is another
    generator's), else the cache's folder for this generator, written on first use."""
    model = clara.model
    dtype = next(model.causal_lm.parameters()).dtype
    fingerprint = vllm_fingerprint(model, dtype)
    if vllm_model is not None:
        found = export_fingerprint(vllm_model)
        if found != fingerprint:
            raise ConfigError(
                "vllm_model",
                vllm_model,
                f"an export of this checkpoint's generator (fingerprint {fingerprint}, {dtype}); it holds "
                f"{'no clara vLLM export' if found is None else f'the export of another generator ({found})'}: "
                "make one with `clara export --format vllm`, or leave --vllm_model out",
            )
        return vllm_model, fingerprint
    folder = os.path.join(export_cache(), fingerprint)
    if export_fingerprint(folder) != fingerprint:
        with holding(folder, "clara serve --engine vllm (writing the generator's export)"):
            if export_fingerprint(folder) != fingerprint:
                write_vllm_export(model, folder, dtype)
    return folder, fingerprint


@contextlib.contextmanager
def vllm_endpoint(
    clara: CLaRa,
    *,
    python: str | None,
    model_dir: str | None,
    url: str | None,
    api_key: str | None,
    extra_args: list[str],
    max_model_len: int,
    timeout: float,
    log_path: str,
    log=print,
) -> Iterator[tuple[str, str | None]]:
    """The (…/v1 URL, key) of the vLLM server that answers: `url` as given, or a server started here from
    `python` on the generator's export, stopped with every process it started when the block ends (or when
    this process dies: clara.vllm_server's keeper)."""
    if url is not None:
        log(
            f"warning: --vllm_url {url}: that server loads the prompt embeddings clara sends with torch.load; it "
            "must listen on the loopback address only (or carry a key that only clara has)",
            flush=True,
        )
        yield url, api_key
        return
    folder, fingerprint = generator_export(clara, model_dir)
    dtype = str(next(clara.model.causal_lm.parameters()).dtype).removeprefix("torch.")
    args = ["--enable-prompt-embeds", "--dtype", dtype, "--served-model-name", SERVED_NAME]
    args += ["--max-model-len", str(max_model_len), "--generation-config", "vllm"]
    if not torch.cuda.is_available():
        args.append("--enforce-eager")  # vLLM's CPU build compiles nothing worth the start-up
    server = VLLMServer(python, folder, args + extra_args, log_path=log_path, timeout=timeout, env=vllm_env())
    started = time.monotonic()
    log(
        f"Starting vLLM on the generator's export {folder} (fingerprint {fingerprint}); its log: {log_path}", flush=True
    )
    try:
        try:
            server.start()
        except VLLMStartError as error:
            raise RunFailure(str(error)) from None
        log(f"vLLM ready after {time.monotonic() - started:.0f}s", flush=True)
        yield server.url, server.api_key
    finally:
        server.stop()  # and every process it started, on any exit (a signal's SystemExit included)
        log("vLLM stopped", flush=True)


def vllm_env() -> dict:
    """This process's environment for vLLM, with the CPU build's defaults where the user set none."""
    return {**CPU_ENV_DEFAULTS, **os.environ}
