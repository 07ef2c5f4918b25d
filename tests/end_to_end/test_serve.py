"""`python -m clara.serve`: the OpenAI-compatible server, driven as its users drive it (the `openai` client,
plain HTTP, a browser), against the reference paths (`CLaRa.generate_from_questions(index=...)`, clara.index.ask).

One server runs for the whole module: the session's trained tiny stage-2 model (tests/conftest.py: two steps, so
plumbing and agreement, not quality) over its 40-document index, with an API key.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
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
from clara.ports import free_port
from clara.serving.engine import ANSWERING, Engine, Job
from clara.stages.prompts import SYSTEM_ANSWER
from tests.helpers import EXAMPLE, SHARED_INDEX_DOCUMENTS, SHARED_TOP_K, read_jsonl, run_module, subprocess_env

pytestmark = pytest.mark.slow

KEY = "test-key-123"
NEW_TOKENS = 8
N_DOCS = SHARED_INDEX_DOCUMENTS
TOP_K = SHARED_TOP_K
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def questions() -> list[str]:
    return [q["question"] for q in read_jsonl(EXAMPLE / "end_to_end_data_eval.jsonl")[:8]]


@pytest.fixture(scope="module")
def reference(trained_checkpoints, trained_index) -> tuple[CLaRa, str, Path]:
    """The reference model (one question at a time), and the index folder: the session's shared stage-2 model
    and its index (tests/conftest.py)."""
    checkpoint = trained_checkpoints["stage2"]
    return CLaRa.from_pretrained(str(checkpoint), batch_size=1), str(trained_index), checkpoint


@pytest.fixture(scope="module")
def server(reference) -> str:
    _, index, checkpoint = reference
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "clara.serve",
            "--checkpoint",
            str(checkpoint),
            "--index",
            index,
            "--port",
            str(port),
            "--api_key",
            KEY,
            "--max_batch",
            "32",
            "--max_wait_ms",
            "100",
            "--max_tokens",
            str(NEW_TOKENS),
            "--max_body_bytes",
            str(MAX_BODY),
            "--model_name",
            "ck",
            "--model_name",
            "clara",
        ],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/health", headers=auth(), timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        assert proc.poll() is None, proc.stdout.read()
        yield url
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    assert "Serving 'ck' (40 documents" in output and "Traceback" not in output, output


def auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def client(server: str, timeout: float = 120) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=timeout)


def health(server: str) -> dict:
    return httpx.get(f"{server}/health", headers=auth()).json()


def ask(server: str, question: str, timeout: float = 120, **fields):
    """Model "ck" asked `question` with NEW_TOKENS tokens unless `fields` say otherwise (stream=True: the chunks)."""
    fields = {"max_tokens": NEW_TOKENS, **fields}
    return client(server, timeout).chat.completions.create(
        model="ck", messages=[{"role": "user", "content": question}], **fields
    )


# -- answers ------------------------------------------------------------------------------------------------
def test_plain_and_streamed_completions_through_the_openai_client(server, reference, questions):
    clara, index, _ = reference
    expected, ids = clara.generate_from_questions(questions[:1], index=index, max_new_tokens=NEW_TOKENS)
    plain = ask(server, questions[0])
    assert plain.object == "chat.completion" and plain.model == "ck" and plain.id.startswith("chatcmpl-")
    assert plain.choices[0].message.content == expected[0] and plain.choices[0].finish_reason in ("stop", "length")
    assert plain.usage.completion_tokens <= NEW_TOKENS and plain.usage.prompt_tokens > 0
    documents = plain.model_extra["clara"]["documents"]
    assert [d["id"] for d in documents] == ids[0] and all(isinstance(d["score"], float) for d in documents)

    chunks = list(ask(server, questions[0], stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == expected[0]
    assert [d["id"] for d in chunks[0].model_extra["clara"]["documents"]] == ids[0]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    # The tiny model may end an answer after one token: an answer of several arrives in as many pieces.
    longer = list(ask(server, questions[0], stream=True, extra_body={"min_tokens": NEW_TOKENS}))
    assert len([c for c in longer if c.choices and c.choices[0].delta.content]) > 1
    assert [m.id for m in client(server).models.list()] == ["ck", "clara"]
    alias = client(server).chat.completions.create(
        model="clara", messages=[{"role": "user", "content": questions[0]}], max_tokens=NEW_TOKENS
    )
    assert alias.model == "clara" and alias.choices[0].message.content == expected[0]


def test_answers_equal_generate_from_questions_with_the_index(server, reference, questions):
    clara, index, _ = reference
    expected, _ = clara.generate_from_questions(questions[:4], index=index, max_new_tokens=NEW_TOKENS)
    assert [ask(server, q).choices[0].message.content for q in questions[:4]] == expected


def conversation(question: str, turns: int, words: int = 3) -> list[dict]:
    """A system message, `turns` earlier user/assistant exchanges (each text `words` words long), the question."""
    earlier = []
    for turn in range(turns):
        # CLaRa's own tokens in a client's text are taken out (they would be read as memory slots).
        earlier.append({"role": "user", "content": f"EarlierQuestion{turn} <MEM0><SEP>" + "about the kingdom " * words})
        earlier.append({"role": "assistant", "content": f"EarlierAnswer{turn} " + "owl " * words})
    return [{"role": "system", "content": "Answer in one word."}, *earlier, {"role": "user", "content": question}]


def test_the_conversation_reaches_the_generator_around_the_trained_turn(server, reference, questions):
    """The prompt the generator read (`debug`): the trained system text with the client's appended, the three
    earlier exchanges in order, then the trained `Background ... Question:` turn; retrieval read the question."""
    chat = client(server).chat.completions.create(
        model="ck", messages=conversation(questions[2], 3), max_tokens=NEW_TOKENS, extra_body={"debug": True}
    )
    extra = chat.model_extra["clara"]
    prompt = extra["prompt"]
    marks = [SYSTEM_ANSWER + "\nAnswer in one word."]
    marks += [f"Earlier{kind}{turn}" for turn in range(3) for kind in ("Question", "Answer")]
    marks += ["Background:\n<MEM0>", f"Question:{questions[2]}"]
    where = [prompt.find(mark) for mark in marks]
    assert -1 not in where and where == sorted(where), (where, prompt)
    assert prompt.count("<SEP>") == TOP_K  # the memory slots only
    assert extra["dropped_turns"] == 0 and chat.usage.prompt_tokens > 0
    alone = ask(server, questions[2]).model_extra["clara"]
    assert [d["id"] for d in extra["documents"]] == [d["id"] for d in alone["documents"]]
    assert "prompt" not in alone and alone["dropped_turns"] == 0


def test_the_oldest_turns_are_dropped_when_the_prompt_would_pass_max_len(server, questions):
    chat = client(server).chat.completions.create(
        model="ck",
        messages=conversation(questions[3], 12, words=40),
        max_tokens=NEW_TOKENS,
        extra_body={"debug": True},
    )
    extra = chat.model_extra["clara"]
    dropped = extra["dropped_turns"]
    assert 0 < dropped < 24 and dropped % 2 == 0, dropped  # whole exchanges: the rest starts with a user turn
    prompt = extra["prompt"]
    assert "EarlierQuestion0 " not in prompt and f"EarlierQuestion{dropped // 2} " in prompt
    assert "EarlierAnswer11 " in prompt and f"Question:{questions[3]}" in prompt
    assert chat.usage.prompt_tokens < ANSWERING.max_len
    # One exchange fewer would not have fitted: the fewest turns were dropped.
    kept = conversation(questions[3], 12, words=40)
    again = client(server).chat.completions.create(
        model="ck", messages=[kept[0], *kept[dropped - 1 :]], max_tokens=NEW_TOKENS
    )
    assert again.model_extra["clara"]["dropped_turns"] == 2


def test_retrieve_returns_the_documents_clara_ask_prints(server, reference, questions):
    _, index, checkpoint = reference
    proc = run_module(
        ["clara.ask", "--checkpoint", str(checkpoint), "--index", index, questions[1], "--max_new_tokens", "2"]
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = re.findall(r"^  \d+\. \[(-?[\d.]+)\] (\S+):", proc.stdout, re.M)
    found = httpx.post(f"{server}/v1/retrieve", headers=auth(), json={"question": questions[1], "k": TOP_K}).json()
    assert [(f"{d['score']:.3f}", d["id"]) for d in found["data"]] == printed and len(printed) == TOP_K
    more = httpx.post(f"{server}/v1/retrieve", headers=auth(), json={"question": questions[1], "k": 10}).json()
    assert [d["id"] for d in more["data"][:TOP_K]] == [i for _, i in printed] and len(more["data"]) == 10
    scores = [d["score"] for d in more["data"]]
    assert scores == sorted(scores, reverse=True)


def test_sampling_with_a_seed_is_reproducible_and_stop_cuts_the_answer(server, questions):
    sampled = [
        ask(server, questions[2], temperature=1.0, top_p=0.9, seed=7).choices[0].message.content for _ in range(2)
    ]
    assert sampled[0] == sampled[1]
    others = {ask(server, questions[2], temperature=1.0, seed=seed).choices[0].message.content for seed in range(4)}
    assert len(others) > 1
    greedy = ask(server, questions[2]).choices[0].message.content
    stop = greedy[len(greedy) // 2 :][:2]
    cut = ask(server, questions[2], stop=[stop]).choices[0]
    assert cut.message.content == greedy[: greedy.index(stop)].rstrip() and cut.finish_reason == "stop"


# -- many users at once -----------------------------------------------------------------------------------------
def test_32_concurrent_requests_are_answered_in_batches_as_one_at_a_time(server, questions):
    alone = ask(server, questions[3]).choices[0].message.content
    before = health(server)
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda _: ask(server, questions[3]).choices[0].message.content, range(32)))
    after = health(server)
    assert answers == [alone] * 32
    assert after["requests"] - before["requests"] == 32
    assert after["batches"] - before["batches"] < 32 and after["largest_batch"] > 1, (before, after)


@pytest.fixture(scope="module")
def long_answer() -> dict:
    """The tiny model soon writes its end token; min_tokens (the server's extension, as vLLM's) keeps it out.
    Long enough to outlast the short request's start on a loaded machine."""
    return {"extra_body": {"min_tokens": 1000}}


def test_a_long_answer_is_decoded_in_windows_and_does_not_hold_up_new_requests(
    server, reference, questions, long_answer
):
    """A 40-token answer takes three windows of 16 tokens (the server's default) and equals the reference; a
    short request sent while a long one decodes joins at the next window and is answered first."""
    clara, index, _ = reference
    expected, _ = clara.generate_from_questions(questions[6:7], index=index, max_new_tokens=40)
    windowed = ask(server, questions[6], max_tokens=40).choices[0]
    assert windowed.message.content == expected[0]
    with ThreadPoolExecutor(2) as pool:
        long = pool.submit(lambda: (ask(server, questions[4], max_tokens=1000, **long_answer), time.monotonic()))
        time.sleep(1.0)
        short = pool.submit(lambda: (ask(server, questions[0]), time.monotonic()))
        (slow, slow_end), (short_answer, short_end) = long.result(), short.result()
    assert slow.usage.completion_tokens >= 1000
    assert short_answer.choices[0].message.content and short_end < slow_end


@torch.no_grad()
def test_a_mixed_batch_differs_from_one_at_a_time_only_at_near_ties(reference, questions):
    """The engine's batched path (clara.serving.engine) with different questions, token by token."""
    clara, index_path, _ = reference
    model, index = clara.model, load_index(index_path)

    def answer(chunk: list[str]) -> tuple[list[list[int]], list[list[int]]]:
        _, rows = index.search(encode_questions(model, chunk, clara.device), TOP_K)
        batch, vectors = generator_inputs(model, index, chunk, rows.tolist(), ANSWERING.max_len, 42)
        decodings = [RowDecoding(Sampling(NEW_TOKENS)) for _ in chunk]
        model.generate(batch, vectors=vectors, rows=decodings)
        return rows.tolist(), [d.tokens for d in decodings]

    batch_rows, batch_tokens = answer(questions)
    for i, question in enumerate(questions):
        rows, tokens = answer([question])
        assert rows[0] == batch_rows[i]
        if tokens[0] == batch_tokens[i]:
            continue
        # The first differing token: the one-at-a-time logits there must be a near tie.
        at = next(t for t, (a, b) in enumerate(zip(tokens[0] + [-1], batch_tokens[i] + [-1])) if a != b)
        batch, vectors = generator_inputs(model, index, [question], rows, ANSWERING.max_len, 42)
        embeds = torch.cat(
            [
                model.inject(batch.dec_ids, vectors),
                model.causal_lm.get_input_embeddings()(torch.tensor([tokens[0][:at]])),
            ],
            dim=1,
        )
        with model.adapter("decoder_adapter"):
            logits = model.causal_lm(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2])).logits
        allowed = logits[0, -1].clone()
        allowed[list(model.tokens.mem_ids) + [model.tokens.ae_id, model.tokens.enc_id, model.tokens.sep_id]] = -1e9
        top = allowed.topk(2).values
        assert float(top[0] - top[1]) < 1e-4, (question, at)


def test_a_failing_request_fails_alone(reference, questions, monkeypatch):
    """The engine in this process, its decoding made to fail whenever one question is in the batch: that
    request gets a 500, the others of its batch their normal answers."""
    clara, index_path, _ = reference
    engine = Engine(clara, load_index(index_path), "ck", max_batch=8, max_wait_ms=200)
    decode = engine._decode

    def failing(jobs):
        if any(job.question == "FAIL" for job in jobs):
            raise RuntimeError("injected")
        decode(jobs)

    monkeypatch.setattr(engine, "_decode", failing)

    async def ask_all() -> list[tuple]:
        loop = asyncio.get_running_loop()
        jobs = [
            engine.submit(Job(q, TOP_K, RowDecoding(Sampling(NEW_TOKENS)), loop))
            for q in [questions[0], "FAIL", questions[1]]
        ]
        finals = []
        for job in jobs:
            while (event := await job.events.get())[0] in ("retrieved", "text"):
                pass
            finals.append(event)
        return finals

    engine.start()
    try:
        finals = asyncio.run(ask_all())
    finally:
        engine.stop()
    expected, _ = clara.generate_from_questions(
        [questions[0], questions[1]], index=index_path, max_new_tokens=NEW_TOKENS
    )
    assert [kind for kind, _ in finals] == ["done", "error", "done"]
    assert [finals[0][1]["text"], finals[2][1]["text"]] == expected
    assert finals[1][1].status == 500 and "injected" in finals[1][1].message
    assert engine.counters.failed == 1 and engine.counters.largest_batch == 3


# -- bad requests ---------------------------------------------------------------------------------------------
def chat_body(**fields) -> dict:
    return {"model": "ck", "messages": [{"role": "user", "content": "Where is Fegund?"}], **fields}


BAD_REQUESTS = [
    ("malformed JSON", "/v1/chat/completions", b'{"model": "ck", "messages": [', auth(), 400, "invalid_json", None),
    ("not an object", "/v1/chat/completions", b"[1, 2]", auth(), 400, "invalid_json", None),
    ("missing messages", "/v1/chat/completions", {"model": "ck"}, auth(), 400, "missing", "messages"),
    (
        "empty question",
        "/v1/chat/completions",
        chat_body(messages=[{"role": "user", "content": "  "}]),
        auth(),
        400,
        "invalid_value",
        "messages",
    ),
    (
        "no user message",
        "/v1/chat/completions",
        chat_body(messages=[{"role": "system", "content": "hi"}]),
        auth(),
        400,
        "invalid_value",
        "messages",
    ),
    (
        "over-long question",
        "/v1/chat/completions",
        chat_body(messages=[{"role": "user", "content": "where " * 600}]),
        auth(),
        400,
        "context_length_exceeded",
        "messages",
    ),
    ("unknown field", "/v1/chat/completions", chat_body(frobnicate=1), auth(), 400, "extra_forbidden", "frobnicate"),
    ("k too small", "/v1/chat/completions", chat_body(k=TOP_K - 1), auth(), 400, "invalid_value", "k"),
    ("k too large", "/v1/chat/completions", chat_body(k=N_DOCS + 1), auth(), 400, "invalid_value", "k"),
    ("k not a number", "/v1/retrieve", {"question": "x", "k": "five"}, auth(), 400, "int_parsing", "k"),
    ("retrieve k of 0", "/v1/retrieve", {"question": "x", "k": 0}, auth(), 400, "invalid_value", "k"),
    (
        "max_tokens over the limit",
        "/v1/chat/completions",
        chat_body(max_tokens=5000),
        auth(),
        400,
        "invalid_value",
        "max_tokens",
    ),
    (
        "bad temperature",
        "/v1/chat/completions",
        chat_body(temperature=-1),
        auth(),
        400,
        "greater_than_equal",
        "temperature",
    ),
    (
        "body over the size limit",
        "/v1/chat/completions",
        chat_body(pad="x" * (MAX_BODY + 1)),
        auth(),
        413,
        "request_too_large",
        None,
    ),
    (
        "unknown model",
        "/v1/chat/completions",
        chat_body(model="../../etc/passwd"),
        auth(),
        404,
        "model_not_found",
        "model",
    ),
    ("no API key", "/v1/chat/completions", chat_body(), {}, 401, "invalid_api_key", None),
    ("wrong API key", "/v1/retrieve", {"question": "x"}, auth("test-key-124"), 401, "invalid_api_key", None),
    ("unknown path", "/v1/files/etc/passwd", {}, auth(), 404, None, None),
]


def post_bad_request(server: str, path: str, body: dict | bytes, headers: dict) -> httpx.Response:
    """A BAD_REQUESTS row sent as JSON (a bytes body as it is)."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server}{path}", content=content, headers={**headers, "Content-Type": "application/json"})


@pytest.mark.parametrize(
    "what, path, body, headers, status, code, param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS]
)
def test_a_bad_request_gets_its_status_and_an_openai_error(server, what, path, body, headers, status, code, param):
    response = post_bad_request(server, path, body, headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["code"], error["param"]) == (code, param), error


def test_the_server_still_answers_after_bad_requests_and_with_the_wrong_method(server, questions):
    response = httpx.get(f"{server}/v1/chat/completions", headers=auth())
    assert response.status_code == 405 and response.json()["error"]["type"] == "invalid_request_error"
    # The openai client reads the errors as its own exceptions.
    with pytest.raises(openai.BadRequestError, match="k=0"):
        ask(server, questions[0], extra_body={"k": 0})
    with pytest.raises(openai.NotFoundError, match="is not served here"):
        client(server).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()
    before = health(server)
    assert ask(server, questions[0]).choices[0].message.content
    assert health(server)["requests"] == before["requests"] + 1 and before["failed"] == 0


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, questions, long_answer):
    before = health(server)
    body = chat_body(
        stream=True, max_tokens=1000, messages=[{"role": "user", "content": questions[4]}], **long_answer["extra_body"]
    )
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, headers=auth(), timeout=60) as response:
        events = (line for line in response.iter_lines() if line.startswith("data: "))
        assert '"clara"' in next(events)  # the first chunk: the role and the documents
        assert all('"content"' in next(events) for _ in range(3))  # then the answer, token by token
    deadline = time.monotonic() + 60
    while health(server)["cancelled"] == before["cancelled"] and time.monotonic() < deadline:
        time.sleep(0.2)
    after = health(server)
    assert after["cancelled"] == before["cancelled"] + 1 and after["requests"] == before["requests"] + 1
    assert ask(server, questions[0]).choices[0].message.content


def test_without_a_key_only_loopback_addresses_are_served(reference):
    _, index, checkpoint = reference
    proc = run_module(
        ["clara.serve", "--checkpoint", str(checkpoint), "--index", index, "--host", "0.0.0.0"], timeout=60
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --host='0.0.0.0': expected a loopback address without an API key (set --api_key or CLARA_API_KEY, "
        "or pass --allow_remote_without_key on a trusted network)"
    ]


# -- the page ---------------------------------------------------------------------------------------------------
def test_the_page_asks_in_a_real_browser_and_shows_the_streamed_answer_and_documents(
    server, reference, questions, tmp_path
):
    if shutil.which("chromedriver") is None or shutil.which("chromium") is None:
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    clara, index, _ = reference
    expected, ids = clara.generate_from_questions(questions[5:6], index=index, max_new_tokens=NEW_TOKENS)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,900"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    browser = webdriver.Chrome(options=options, service=service)
    try:
        browser.get(f"{server}/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: b.find_element(By.ID, "key").is_displayed())  # the server asks for its key
        browser.find_element(By.ID, "key").send_keys(KEY)
        browser.find_element(By.ID, "question").send_keys(questions[5])
        browser.find_element(By.ID, "send").click()
        wait.until(lambda b: b.find_element(By.ID, "status").text == "Done.")
        browser.save_screenshot(str(tmp_path / "page.png"))
        answer = browser.find_element(By.ID, "answer").text
        documents = browser.find_elements(By.CSS_SELECTOR, "#documents li .id")
        scores = browser.find_elements(By.CSS_SELECTOR, "#documents li .score")
        assert answer == expected[0]
        assert [d.text for d in documents] == ids[0]
        assert all(re.fullmatch(r"\[-?\d\.\d{3}\]", s.text) for s in scores)
        assert "ck" in browser.find_element(By.ID, "model").text
    finally:
        browser.quit()
    assert (tmp_path / "page.png").stat().st_size > 1000
