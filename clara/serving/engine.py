"""The model side of the server: one thread owns the model and answers the queued requests in batches.

Requests that arrive together (up to `max_batch`, waiting at most `max_wait_ms` after the first) share
one query-reasoner forward, one search and one generate call; each answer is decoded its own way
(clara.model.decoding) and ends on its own, so its response completes while longer ones in the batch go on.
Answers are decoded `window_tokens` at a time: between windows, requests that arrived meanwhile join the
batch (each continuing answer is fed back after its prompt), so a long answer never holds new ones up
for more than one window.
Between batches the thread looks at the index's index.json: when an add, remove or compact has published a new
generation it loads it and answers new requests from it; a request already admitted keeps the documents (and
their memory vectors) it retrieved from the index it started on.
Only this thread touches the model and its tokenizer: adapter switching and the fast tokenizer are not
safe to share between threads. It talks to the web side through each job's asyncio queue.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from clara.evaluation.inference import CLaRa
from clara.index.answer import encode_questions, generator_prompts
from clara.index.store import META_FILE, CorpusIndex, load_index
from clara.model.collate import encode_supervised, pad_left
from clara.model.decoding import RowDecoding
from clara.openai_protocol import OpenAIError
from clara.stages import stage2

ANSWERING = stage2.STAGE  # the stage whose prompt answers from retrieved documents


@dataclass
class Job:
    """One request. `row` None: retrieval only. Events, in order: ("retrieved", documents), ("text", piece)...,
    ("done", figures), or ("error", OpenAIError) at any point."""

    question: str  # the last user message: what retrieval reads and the trained `Question:` turn holds
    k: int
    row: RowDecoding | None
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    found: list[int] = field(default_factory=list)  # index rows of the documents the generator reads
    memory: torch.Tensor | None = None  # their stored vectors [top_k, n, H], read once from the job's index
    prompt_tokens: int = 0
    system: str = ""  # the client's system text, appended to the trained system prompt
    turns: list[dict] = field(default_factory=list)  # earlier turns ({"role", "content"}), oldest first
    prompt_ids: list[int] = field(default_factory=list)  # the generator's prompt (set when admitted)
    dropped_turns: int = 0  # earlier turns left out, oldest first, for the prompt to fit max_len
    debug: bool = False  # also set prompt_text: the generator's prompt as text (a request's `debug`)
    prompt_text: str = ""
    abort: Callable[[], object] | None = None  # stops the answer where another process decodes it (vLLM)

    def send(self, kind: str, value) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def cancel(self) -> None:
        if self.row is not None:
            self.row.cancelled.set()
        if self.abort is not None:
            self.abort()


@dataclass
class Counters:
    """What /health reports: requests answered, the batches they were answered in, and the failures."""

    requests: int = 0
    batches: int = 0  # engine steps: one retrieval for the new requests and one window of decoding for all
    largest_batch: int = 0
    cancelled: int = 0
    rejected: int = 0  # questions too long for the model (400)
    failed: int = 0  # errors of the server's own (500)
    busy_seconds: float = 0.0
    index_swaps: int = 0  # new generations of the index taken up while serving


class Engine:
    kind = "hf"  # what /health names: this process decodes with transformers

    def __init__(
        self,
        clara: CLaRa,
        index: CorpusIndex,
        model_name: str | list[str],
        max_batch: int = 16,
        max_wait_ms: float = 10.0,
        window_tokens: int = 16,
        max_len: int | None = None,
        seed: int = 42,
    ):
        self.clara, self.index = clara, index
        # Every name clients may use; the first is the one the server reports.
        self.model_names = [model_name] if isinstance(model_name, str) else list(model_name)
        self.model_name = self.model_names[0]
        self.max_batch, self.max_wait, self.window_tokens = max_batch, max_wait_ms / 1000, window_tokens
        # The prompt length and prompt choice of CLaRa.generate_from_questions(index=...), so answers agree.
        self.max_len, self.seed = max_len or clara.max_len or ANSWERING.max_len, seed
        self.counters = Counters()
        self._index_stamp = _stamp(index.path)
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    @property
    def top_k(self) -> int:
        """How many retrieved documents the generator reads (the checkpoint's generation_top_k)."""
        return self.clara.model.settings.generation_top_k

    def queued(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="clara-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout=60)

    def submit(self, job: Job) -> Job:
        self._queue.put(job)
        return job

    # -- the engine thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        active: list[Job] = []
        while (new := self._collect(wait=not active, room=self.max_batch - len(active))) is not None:
            started = time.perf_counter()
            self._follow_index()
            active = self._step_isolated(active, new)
            self.counters.busy_seconds += time.perf_counter() - started

    def _follow_index(self) -> None:
        """Take up a generation of the index published since the last look (index.json is replaced whole, so a
        changed inode or time means a new one). A load that fails keeps the index in use and says why."""
        stamp = _stamp(self.index.path)
        if stamp == self._index_stamp:
            return
        self._index_stamp = stamp
        try:
            index = load_index(self.index.path)
        except Exception as error:  # noqa: BLE001 - the server goes on with the index it has
            print(f"index {self.index.path}: not swapped ({type(error).__name__}: {error})", flush=True)
            return
        if index.meta["fingerprint"] != self.index.meta["fingerprint"] or index.documents < self.top_k:
            print(f"index {self.index.path}: not swapped (another compressor, or too few documents)", flush=True)
            return
        # Jobs in flight hold their documents' vectors and texts already: the old index's files may close.
        previous, self.index = self.index, index
        previous.close()
        self.counters.index_swaps += 1

    def _collect(self, wait: bool, room: int) -> list[Job] | None:
        """New jobs, at most `room`. With nothing decoding: wait for the first, then up to max_wait for more
        (None: stop). While answers are decoding: what is queued now, so they never wait for new ones."""
        jobs: list[Job] = []
        if wait:
            if (first := self._queue.get()) is None:
                return None
            jobs.append(first)
        deadline = time.monotonic() + (self.max_wait if wait else 0.0)
        while len(jobs) < room:
            try:
                job = (
                    self._queue.get(timeout=max(0.0, deadline - time.monotonic())) if wait else self._queue.get_nowait()
                )
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)  # stop once the answers being decoded are finished
                break
            jobs.append(job)
        return jobs

    def _step_isolated(self, active: list[Job], new: list[Job]) -> list[Job]:
        """One step; if it fails, each of its jobs that has not streamed anything yet is answered alone, so
        that a failing request (or a batch too large for the device) fails alone."""
        try:
            return self._step(active, new)
        except Exception as error:  # noqa: BLE001 - reported to the clients, and the engine goes on
            if len(active) + len(new) == 1:
                self._fail((active + new)[0], error)
                return []
        for job in active + new:
            try:
                if job.row is not None and job.row.emitted:
                    raise RuntimeError("the batch failed after this answer had started")
                if job.row is not None:
                    job.row = RowDecoding(job.row.sampling, job.row.on_text, job.row.cancelled)
                left = self._step([], [job])
                while left:
                    left = self._step(left, [])
            except Exception as error:  # noqa: BLE001
                self._fail(job, error)
        return []

    def _fail(self, job: Job, error: Exception) -> None:
        self.counters.failed += 1
        job.send(
            "error", OpenAIError(500, f"the server failed answering: {type(error).__name__}: {error}", "server_error")
        )

    @torch.no_grad()
    def _step(self, active: list[Job], new: list[Job]) -> list[Job]:
        """Retrieve for the new jobs, then decode every answer (new and continuing) for up to window_tokens
        tokens in one batch; returns the answers still decoding."""
        new = [job for job in new if self._admit(job)]
        if new:
            self._retrieve(new)
        decoding = active + [job for job in new if job.row is not None]
        if new or decoding:
            self.counters.batches += 1
            self.counters.largest_batch = max(self.counters.largest_batch, len(decoding) or len(new))
        if decoding:
            self._decode(decoding)
        for job in new + active:
            if job.row is None or job.row.finish_reason is not None:
                self._done(job)
        return [job for job in decoding if job.row.finish_reason is None]

    def _retrieve(self, jobs: list[Job]) -> None:
        model = self.clara.model
        questions = [job.question for job in jobs]
        scores, rows = self.index.search(
            encode_questions(model, questions, self.clara.device), max(job.k for job in jobs)
        )
        index = self.index
        for job, found, score in zip(jobs, rows.tolist(), scores.tolist()):
            job.found = found[: self.top_k]
            if job.row is not None:
                job.memory = index.memory(job.found)
            job.send(
                "retrieved",
                [{"id": index.ids[r], "score": s, "text": index.text(r)} for r, s in list(zip(found, score))[: job.k]],
            )

    def _decode(self, jobs: list[Job]) -> None:
        """The prompts, each followed by its answer's tokens so far, and window_tokens more of every answer."""
        model = self.clara.model
        batch = generator_prompts(model, [job.question for job in jobs], self.max_len, self.seed)
        vectors = torch.cat([job.memory for job in jobs]).reshape(-1, model.hidden_size)
        # Each prompt is the job's own (the conversation around the trained turn), followed by its answer so far.
        rows = [job.prompt_ids + job.row.tokens for job in jobs]
        for job in jobs:
            job.prompt_tokens = len(job.prompt_ids)
        batch.dec_ids = pad_left(rows, model.tokens.pad_id)
        batch.dec_mask = pad_left([[1] * len(row) for row in rows], 0)
        model.generate(
            batch.to(self.clara.device),
            max_new_tokens=self.window_tokens,
            vectors=vectors.to(self.clara.device),
            rows=[job.row for job in jobs],
        )

    def _done(self, job: Job) -> None:
        self.counters.requests += 1
        if job.row is None:
            job.send("done", {})
            return
        if job.row.finish_reason == "cancelled":
            self.counters.cancelled += 1
        job.send(
            "done",
            {
                "finish_reason": job.row.finish_reason,
                "text": job.row.text,
                "prompt_tokens": job.prompt_tokens,
                "completion_tokens": len(job.row.tokens),
            },
        )

    def _admit(self, job: Job) -> bool:
        """False for a job cancelled while queued, or whose question the model cannot read whole (400)."""
        if job.row is not None and job.row.cancelled.is_set():
            self.counters.cancelled += 1
            job.send("done", {"finish_reason": "cancelled"})
            return False
        problem = self.length_problem(job.question)
        if problem is None and job.row is not None:
            try:
                job.prompt_ids, job.dropped_turns = self.conversation_prompt(job)
                if job.debug:
                    job.prompt_text = self.clara.model.tokenizer.decode(job.prompt_ids)
            except Exception as error:  # noqa: BLE001 - the chat template refused the conversation's shape
                message = f"messages: the model's chat template refused them: {error}"
                job.send("error", OpenAIError(400, message, param="messages", code="invalid_value"))
                self.counters.rejected += 1
                return False
            if len(job.prompt_ids) >= self.max_len:
                problem = (
                    f"the prompt is {len(job.prompt_ids)} tokens with this question; "
                    f"the model's MAX_LEN is {self.max_len}"
                )
        if problem:
            self.counters.rejected += 1
            job.send("error", OpenAIError(400, problem, param="messages", code="context_length_exceeded"))
        return problem is None

    def length_problem(self, question: str) -> str | None:
        """Why the question is too long for this model, or None. The query reasoner reads doc_max_length tokens
        of it and the generator's prompt must fit max_len with room to answer."""
        model = self.clara.model
        tokens = len(model.tokenizer(question, add_special_tokens=False)["input_ids"])
        if tokens > model.settings.doc_max_length:
            return (
                f"the question is {tokens} tokens; the query reasoner reads at most "
                f"{model.settings.doc_max_length} (the checkpoint's doc_max_length)"
            )
        system, user, _ = ANSWERING.example(
            {"question": question, "answer": ""}, model.tokens.n_mem, self.top_k, self.seed
        )
        prompt = len(encode_supervised(model.tokenizer, system, user, None, self.max_len)[0])
        if prompt >= self.max_len:
            return f"the prompt is {prompt} tokens with this question; the model's MAX_LEN is {self.max_len}"
        return None

    def conversation_prompt(self, job: Job) -> tuple[list[int], int]:
        """The generator's prompt ids for the job, and how many of its earlier turns were left out.

        The trained prompt stays as it was: the stage-2 system text (the client's system text appended after a
        newline) and the `Background ... Question:` user turn last; the client's earlier turns go between them.
        When the prompt would reach max_len, the oldest turns are left out (a conversation then starts at a user
        turn), the fewest that make it fit, found by bisection (a few renderings, however long the conversation).
        """
        model = self.clara.model
        system, user, _ = ANSWERING.example(
            {"question": job.question, "answer": ""}, model.tokens.n_mem, self.top_k, self.seed
        )
        if job.system:
            system = f"{system}\n{job.system}"
        turns = job.turns

        def ids(start: int) -> list[int]:
            text = conversation_text(model.tokenizer, system, turns[start:], user)
            return model.tokenizer(text, add_special_tokens=False)["input_ids"]

        full = ids(0)
        if len(full) < self.max_len or not turns:
            return full, 0
        starts = [i for i in range(1, len(turns)) if turns[i]["role"] == "user"] + [len(turns)]
        low, high = 0, len(starts) - 1  # the answer is starts[high] once the loop ends
        while low < high:
            middle = (low + high) // 2
            if len(ids(starts[middle])) < self.max_len:
                high = middle
            else:
                low = middle + 1
        return ids(starts[high]), starts[high]


def _stamp(path: str) -> tuple[int, int]:
    """What changes when index.json is published anew: its inode and modification time."""
    status = os.stat(os.path.join(path, META_FILE))
    return status.st_ino, status.st_mtime_ns


def conversation_text(tokenizer, system: str, turns: list[dict], user: str) -> str:
    """The chat template over system, turns and the final user turn, with a generation prompt (as
    clara.stages.prompts renders the trained prompt); a template that rejects a system role gets the system
    text, a newline and the first user turn as one user turn."""
    messages = [{"role": "system", "content": system}, *turns, {"role": "user", "content": user}]

    def render(chat: list[dict]) -> str:
        return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, enable_thinking=False)

    try:
        return render(messages)
    except Exception as error:
        rest = messages[1:]
        first = next(i for i, m in enumerate(rest) if m["role"] == "user")
        rest[first] = {"role": "user", "content": system + "\n" + rest[first]["content"]}
        try:
            return render(rest)
        except Exception:
            raise error from None
