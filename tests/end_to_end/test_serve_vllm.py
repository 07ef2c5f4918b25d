"""`clara serve --engine vllm`: the same API as the hf engine, answered by a real vLLM server (the CPU build, in
the environment scripts/make_vllm_env.sh makes) that the clara process starts, owns and stops.

One clara server with vLLM runs for the session (test_serve.py's checkpoint and 40-document index, its API key
and names, so that its table of bad requests applies as it is); the SIGTERM test starts one more (on the
session's export, so nothing is exported twice) and the `kill -9` test, last, kills the session's own.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from clara.evaluation.inference import CLaRa
from clara.index.answer import encode_questions, generator_inputs
from clara.index.store import load_index
from clara.model.decoding import RowDecoding, Sampling
from clara.model.vllm_export import EXPORT_INFO, vllm_fingerprint
from clara.ports import free_port
from clara.serving.engine import ANSWERING
from clara.vllm_server import descendants
from tests.end_to_end.test_serve import BAD_REQUESTS, KEY, MAX_BODY, N_DOCS, NEW_TOKENS, auth, health, post_bad_request
from tests.end_to_end.test_serve import ask as serve_ask
from tests.helpers import (
    EXAMPLE,
    ROLES,
    SHARED_TOP_K,
    index_example_documents,
    noisy_checkpoint,
    read_jsonl,
    subprocess_env,
    vllm_python,
)
from tests.test_vllm_server import alive, wait_gone

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

TOP_K = SHARED_TOP_K
START_SECONDS = 600  # vLLM's start on a loaded 2-core machine: about a minute idle, several when busy


@pytest.fixture(scope="session")
def vllm_work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve_vllm")


@pytest.fixture(scope="session")
def vllm_reference(vllm_work) -> tuple[CLaRa, str, Path]:
    # generation_top_k as the shared model has it: the bad-request table of test_serve is written for it
    checkpoint = noisy_checkpoint(vllm_work / "ck", {r: i + 1 for i, r in enumerate(ROLES)}, top_k=TOP_K)
    clara = CLaRa.from_pretrained(str(checkpoint), batch_size=1)
    index_example_documents(clara.model, checkpoint, vllm_work / "index", N_DOCS)
    return clara, str(vllm_work / "index"), checkpoint


@pytest.fixture(scope="session")
def questions() -> list[str]:
    return [q["question"] for q in read_jsonl(EXAMPLE / "end_to_end_data_eval.jsonl")[:8]]


class Served:
    """A `clara serve --engine vllm` process: its URL, its output so far and its vLLM log."""

    def __init__(self, work: Path, checkpoint: Path, index: str, name: str, *extra: str):
        self.port, self.log = free_port(), work / f"{name}-vllm.log"
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "clara", "serve", "--checkpoint", str(checkpoint), "--index", index]
        command += ["--port", str(self.port), "--api_key", KEY, "--model_name", "ck", "--model_name", "clara"]
        command += ["--max_tokens", str(NEW_TOKENS), "--max_body_bytes", str(MAX_BODY), "--max_tokens_limit", "1024"]
        command += ["--engine", "vllm", "--vllm_python", vllm_python(), "--vllm_log", str(self.log), *extra]
        env = subprocess_env(CLARA_HOME=str(work / "clara_home"))
        self.output = work / f"{name}.out"
        with open(self.output, "w") as out:
            self.proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(f"{self.url}/health", headers=auth(), timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.5)
        self.stop()
        raise AssertionError(f"clara serve --engine vllm did not come up:\n{self.text()}")

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)


@pytest.fixture(scope="session")
def served(vllm_work, vllm_reference):
    _, index, checkpoint = vllm_reference
    # vLLM logs each request's end (an abort included) with --enable-log-requests, passed through --vllm_args.
    server = Served(vllm_work, checkpoint, index, "session", "--vllm_args=--enable-log-requests")
    yield server
    server.stop()
    assert "Traceback" not in server.text(), server.text()


@pytest.fixture(scope="session")
def server(served) -> str:
    return served.url


def ask(server: str, question: str, **fields):
    """test_serve's `ask`, with the time vLLM answers in on a busy CPU."""
    return serve_ask(server, question, timeout=300, **fields)


# -- answers ------------------------------------------------------------------------------------------------
def test_plain_and_streamed_answers_through_the_openai_client(served, vllm_reference, questions):
    server, (clara, index, _) = served.url, vllm_reference
    plain = ask(server, questions[0])
    answer = plain.choices[0].message.content
    assert answer and plain.model == "ck" and plain.choices[0].finish_reason in ("stop", "length")
    assert 0 < plain.usage.completion_tokens <= NEW_TOKENS and plain.usage.prompt_tokens > 0
    _, ids = clara.generate_from_questions(questions[:1], index=index, max_new_tokens=1)
    assert [d["id"] for d in plain.model_extra["clara"]["documents"]] == ids[0]
    chunks = list(
        ask(
            server,
            questions[0],
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"min_tokens": NEW_TOKENS},
        )
    )
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and chunks[-1].usage.completion_tokens == NEW_TOKENS
    assert [d["id"] for d in chunks[0].model_extra["clara"]["documents"]] == ids[0]
    state = health(server)
    assert state["engine"] == "vllm" and state["window_tokens"] is None and state["failed"] == 0
    # The generator's export, made on first use in the cache and named by its fingerprint.
    fingerprint = vllm_fingerprint(clara.model, torch.float32)
    info = json.loads((served.output.parent / "clara_home" / "vllm-exports" / fingerprint / EXPORT_INFO).read_text())
    assert info["generator_fingerprint"] == fingerprint and info["padded_head_dim"] == 32


def reference_tokens(clara: CLaRa, index, question: str) -> tuple[list[int], list[int]]:
    """The hf engine's greedy answer tokens for one question, and its index rows."""
    model = clara.model
    _, rows = index.search(encode_questions(model, [question], clara.device), TOP_K)
    batch, vectors = generator_inputs(model, index, [question], rows.tolist(), ANSWERING.max_len, 42)
    decoding = RowDecoding(Sampling(NEW_TOKENS))
    model.generate(batch, vectors=vectors, rows=[decoding])
    return decoding.tokens, rows.tolist()


@torch.no_grad()
def top_two_gap(clara: CLaRa, index, question: str, rows: list[list[int]], tokens: list[int]) -> float:
    """The hf engine's gap between its two best allowed logits after `tokens` of the answer."""
    model = clara.model
    batch, vectors = generator_inputs(model, index, [question], rows, ANSWERING.max_len, 42)
    answer = model.causal_lm.get_input_embeddings()(torch.tensor([tokens], dtype=torch.long))
    embeds = torch.cat([model.inject(batch.dec_ids, vectors), answer], dim=1)
    with model.adapter("decoder_adapter"):
        logits = model.causal_lm(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2])).logits[0, -1]
    logits[list(model.tokens.mem_ids) + [model.tokens.ae_id, model.tokens.enc_id, model.tokens.sep_id]] = -1e9
    top = logits.topk(2).values
    return float(top[0] - top[1])


def test_greedy_answers_equal_the_hf_engines_in_float32(server, vllm_reference, questions):
    """All eight example questions at once (vLLM batches them); a difference only at a near tie (< 1e-4)."""
    clara, index_path, _ = vllm_reference
    index = load_index(index_path)
    with ThreadPoolExecutor(len(questions)) as pool:
        answers = list(pool.map(lambda q: ask(server, q).choices[0].message.content, questions))
    tokenizer = clara.model.tokenizer
    for question, answer in zip(questions, answers):
        tokens, rows = reference_tokens(clara, index, question)
        expected = tokenizer.decode(tokens, skip_special_tokens=True).strip()
        if answer == expected:
            continue
        prefixes = [tokenizer.decode(tokens[: t + 1], skip_special_tokens=True).strip() for t in range(len(tokens))]
        at = next((t for t, prefix in enumerate(prefixes) if not answer.startswith(prefix)), len(tokens))
        gap = top_two_gap(clara, index, question, rows, tokens[:at])
        print(f"vLLM differs from hf at token {at} of {question!r}: top-two gap {gap:.2e}")
        assert gap < 1e-4, (question, answer, expected, at, gap)


def test_sampling_parameters_reach_vllm(server, questions):
    sampled = [ask(server, questions[1], temperature=1.0, top_p=0.9, seed=7).choices[0].message.content]
    sampled.append(ask(server, questions[1], temperature=1.0, top_p=0.9, seed=7).choices[0].message.content)
    assert sampled[0] == sampled[1]
    long = ask(server, questions[1], max_tokens=12, extra_body={"min_tokens": 12})
    assert long.usage.completion_tokens == 12 and long.choices[0].finish_reason == "length"
    # vLLM looks for stop strings only after min_tokens (the hf engine from the first token): none here.
    text = ask(server, questions[1], max_tokens=12).choices[0].message.content
    assert len(text) >= 4, text
    stop = text[len(text) // 2 :][:3]
    cut = ask(server, questions[1], max_tokens=12, stop=[stop])
    assert cut.choices[0].message.content == text[: text.index(stop)].strip()
    assert cut.choices[0].finish_reason == "stop"
    short = ask(server, questions[1], max_tokens=2)
    assert short.usage.completion_tokens <= 2 and text.startswith(short.choices[0].message.content)


@pytest.mark.parametrize(
    "what, path, body, headers, status, code, param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS]
)
def test_a_bad_request_gets_its_status_and_an_openai_error(server, what, path, body, headers, status, code, param):
    response = post_bad_request(server, path, body, headers)
    assert response.status_code == status, response.text
    assert (response.json()["error"]["code"], response.json()["error"]["param"]) == (code, param)


def test_the_page_and_the_counters(server, questions):
    page = httpx.get(server)
    assert page.status_code == 200 and "<html" in page.text.lower()
    before = health(server)
    ask(server, questions[2])
    with pytest.raises(openai.BadRequestError):
        ask(server, questions[2], extra_body={"k": 0})
    after = health(server)
    assert after["requests"] == before["requests"] + 1 and after["rejected"] == before["rejected"]
    assert after["batches"] == before["batches"] + 1 and after["failed"] == 0


def test_a_client_that_disconnects_aborts_its_vllm_request(served, questions):
    server = served.url
    before = health(server)
    body = {"model": "ck", "messages": [{"role": "user", "content": questions[3]}], "stream": True}
    body.update(max_tokens=1000, min_tokens=1000)
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, headers=auth(), timeout=300) as reply:
        for line in reply.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                break
    deadline = time.monotonic() + 60
    while health(server)["cancelled"] == before["cancelled"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert health(server)["cancelled"] == before["cancelled"] + 1
    # vLLM itself let the request go: it says so in its log, and the next answer comes at once.
    aborted = re.compile(r"Request \S+ aborted|Aborted request")
    deadline = time.monotonic() + 30
    while not aborted.search(served.log.read_text(errors="replace")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert aborted.search(served.log.read_text(errors="replace"))
    assert ask(server, questions[3]).choices[0].message.content


def test_a_hung_vllm_fails_the_request_after_vllm_timeout(vllm_work, vllm_reference, questions):
    """A vLLM that takes the request and never answers (a socket nobody reads): --vllm_timeout seconds later the
    client gets a 500 that says so, counted as a failure by a server that goes on."""
    _, index, checkpoint = vllm_reference
    with socket.create_server(("127.0.0.1", 0)) as hung:
        url = f"http://127.0.0.1:{hung.getsockname()[1]}/v1"
        served = Served(vllm_work, checkpoint, index, "hung", "--vllm_url", url, "--vllm_timeout", "3")
        try:
            started = time.monotonic()
            with pytest.raises(openai.InternalServerError, match="ReadTimeout"):
                ask(served.url, questions[0])
            assert time.monotonic() - started < 60
            assert health(served.url)["failed"] == 1
        finally:
            served.stop()
    assert "Traceback" not in served.text(), served.text()


# -- no vLLM process outlives clara ---------------------------------------------------------------------------
def vllm_processes(pid: int) -> list[int]:
    """The processes below clara's: vLLM's keeper, its server and the server's engine."""
    found = sorted(descendants(pid))
    assert len(found) >= 3, found  # keeper, API server, engine core
    return found


def test_sigterm_of_clara_stops_vllm_and_every_process_it_started(vllm_work, vllm_reference, served):
    _, index, checkpoint = vllm_reference
    clara, _, _ = vllm_reference
    export = vllm_work / "clara_home" / "vllm-exports" / vllm_fingerprint(clara.model, torch.float32)
    other = Served(vllm_work, checkpoint, index, "sigterm", "--vllm_model", str(export))
    watched = vllm_processes(other.proc.pid)
    other.proc.send_signal(signal.SIGTERM)
    assert other.proc.wait(timeout=60) == 0
    assert wait_gone(watched, 30) == []
    assert "vLLM stopped" in other.text() and "Traceback" not in other.text(), other.text()


def test_an_export_of_another_generator_is_refused(vllm_work, vllm_reference, tmp_path):
    _, index, checkpoint = vllm_reference
    (tmp_path / EXPORT_INFO).write_text(json.dumps({"generator_fingerprint": "0123456789abcdef"}))
    command = [sys.executable, "-m", "clara", "serve", "--checkpoint", str(checkpoint), "--index", index]
    command += ["--engine", "vllm", "--vllm_python", vllm_python(), "--vllm_model", str(tmp_path)]
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "--vllm_model" in done.stderr and "0123456789abcdef" in done.stderr and "fingerprint" in done.stderr


def test_kill_9_of_clara_stops_vllm_through_the_lifeline(served):
    """Last: it kills the session's server (its fixture's teardown then finds it gone)."""
    watched = vllm_processes(served.proc.pid)
    os.kill(served.proc.pid, signal.SIGKILL)
    served.proc.wait(timeout=30)
    assert wait_gone(watched, 30) == []
    assert not any(alive(pid) for pid in watched)
