"""The model side of the server: one thread owns the model and answers the queued requests in batches.

Requests that arrive together (up to `max_batch`, waiting at most `max_wait_ms` after the first) share
one query-reasoner forward, one search and one generate call; each answer is decoded its own way
(clara.decoding) and ends on its own, so its response completes while longer ones in the batch go on.
Only this thread touches the model and its tokenizer: adapter switching and the fast tokenizer are not
safe to share between threads. It talks to the web side through each job's asyncio queue.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from clara.collate import encode_supervised
from clara.decoding import RowDecoding
from clara.index import CorpusIndex, encode_questions, generator_inputs
from clara.inference import CLaRa
from clara.openai_protocol import OpenAIError
from clara.stages import STAGES

ANSWERING = STAGES["stage2"]  # the stage whose prompt answers from retrieved documents


@dataclass
class Job:
    """One request. `row` None: retrieval only. Events, in order: ("retrieved", documents), ("text", piece)...,
    ("done", figures), or ("error", OpenAIError) at any point."""

    question: str
    k: int
    row: RowDecoding | None
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)

    def send(self, kind: str, value) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def cancel(self) -> None:
        if self.row is not None:
            self.row.cancelled.set()


@dataclass
class Counters:
    """What /health reports: requests answered, the batches they were answered in, and the failures."""

    requests: int = 0
    batches: int = 0
    largest_batch: int = 0
    cancelled: int = 0
    rejected: int = 0  # questions too long for the model (400)
    failed: int = 0  # errors of the server's own (500)
    busy_seconds: float = 0.0


class Engine:
    def __init__(self, clara: CLaRa, index: CorpusIndex, model_name: str, max_batch: int = 16,
                 max_wait_ms: float = 10.0, max_len: int | None = None, seed: int = 42):
        self.clara, self.index, self.model_name = clara, index, model_name
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000
        # The prompt length and prompt choice of CLaRa.generate_from_questions(index=...), so answers agree.
        self.max_len, self.seed = max_len or clara.max_len or ANSWERING.max_len, seed
        self.counters = Counters()
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
        while (first := self._queue.get()) is not None:
            jobs = [first]
            deadline = time.monotonic() + self.max_wait
            while len(jobs) < self.max_batch:
                try:
                    job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    self._queue.put(None)  # stop after this batch
                    break
                jobs.append(job)
            started = time.perf_counter()
            self._answer_isolated(jobs)
            self.counters.busy_seconds += time.perf_counter() - started

    def _answer_isolated(self, jobs: list[Job]) -> None:
        """Answer the batch; if it fails, answer each job that has not streamed anything alone, so that one
        failing request fails alone."""
        try:
            self._answer(jobs)
            return
        except Exception as error:  # noqa: BLE001 - reported to the clients, and the engine goes on
            if len(jobs) == 1:
                self._fail(jobs[0], error)
                return
        for job in jobs:
            if job.row is not None and job.row.emitted:
                self._fail(job, RuntimeError("the batch failed after this answer had started"))
                continue
            if job.row is not None:
                job.row = RowDecoding(job.row.sampling, job.row.on_text, job.row.cancelled)
            try:
                self._answer([job])
            except Exception as error:  # noqa: BLE001
                self._fail(job, error)

    def _fail(self, job: Job, error: Exception) -> None:
        self.counters.failed += 1
        job.send("error", OpenAIError(500, f"the server failed answering: {type(error).__name__}: {error}",
                                      "server_error"))

    @torch.no_grad()
    def _answer(self, jobs: list[Job]) -> None:
        jobs = [job for job in jobs if self._admit(job)]
        if not jobs:
            return
        self.counters.batches += 1
        self.counters.largest_batch = max(self.counters.largest_batch, len(jobs))
        model, device = self.clara.model, self.clara.device
        questions = [job.question for job in jobs]
        scores, rows = self.index.search(encode_questions(model, questions, device), max(job.k for job in jobs))
        for job, found, score in zip(jobs, rows.tolist(), scores.tolist()):
            job.send("retrieved", [{"id": self.index.ids[r], "score": s, "text": self.index.texts[r]}
                                   for r, s in list(zip(found, score))[:job.k]])
        answering = [i for i, job in enumerate(jobs) if job.row is not None]
        if answering:
            batch, vectors = generator_inputs(model, self.index, [questions[i] for i in answering],
                                              [rows[i, :self.top_k].tolist() for i in answering],
                                              self.max_len, self.seed)
            model.generate(batch.to(device), vectors=vectors.to(device), rows=[jobs[i].row for i in answering])
            prompt_tokens = batch.dec_mask.sum(1).tolist()
        for number, job in enumerate(jobs):
            self.counters.requests += 1
            if job.row is None:
                job.send("done", {})
                continue
            if job.row.finish_reason == "cancelled":
                self.counters.cancelled += 1
            job.send("done", {"finish_reason": job.row.finish_reason, "text": job.row.text,
                              "prompt_tokens": prompt_tokens[answering.index(number)],
                              "completion_tokens": len(job.row.tokens)})

    def _admit(self, job: Job) -> bool:
        """False for a job cancelled while queued, or whose question the model cannot read whole (400)."""
        if job.row is not None and job.row.cancelled.is_set():
            self.counters.cancelled += 1
            job.send("done", {"finish_reason": "cancelled"})
            return False
        problem = self.length_problem(job.question)
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
            return (f"the question is {tokens} tokens; the query reasoner reads at most "
                    f"{model.settings.doc_max_length} (the checkpoint's doc_max_length)")
        system, user, _ = ANSWERING.example({"question": question, "answer": ""}, model.tokens.n_mem, self.top_k,
                                         self.seed)
        prompt = len(encode_supervised(model.tokenizer, system, user, None, self.max_len)[0])
        if prompt >= self.max_len:
            return f"the prompt is {prompt} tokens with this question; the model's MAX_LEN is {self.max_len}"
        return None
