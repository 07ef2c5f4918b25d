"""`python -m clara.serve` follows its index: while requests keep arriving, `clara index add` publishes a new
generation; the server swaps it in between batches, no request fails, and the answers after the swap may cite
the new documents. /health shows the generation."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from clara.ports import free_port
from tests.helpers import EXAMPLE, ROLES, noisy_checkpoint, read_jsonl, run_module, subprocess_env

pytestmark = pytest.mark.slow

N_DOCS = 20
N_NEW = 6
TOP_K = 3
CLIENTS = 4


def start_server(checkpoint: Path, index: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "clara.serve", "--checkpoint", str(checkpoint), "--index", str(index)]
        + ["--port", str(port), "--max_tokens", "4", "--max_wait_ms", "20"],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    raise AssertionError(proc.communicate()[0])


def test_the_server_swaps_to_the_added_documents_under_load(tmp_path):
    checkpoint = noisy_checkpoint(tmp_path / "ck", {r: i + 1 for i, r in enumerate(ROLES)}, top_k=TOP_K)
    docs = read_jsonl(EXAMPLE / "corpus.jsonl")[: N_DOCS + N_NEW]
    corpus, new = tmp_path / "corpus.jsonl", tmp_path / "new.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs[:N_DOCS]), encoding="utf-8")
    new.write_text("".join(json.dumps(d) + "\n" for d in docs[N_DOCS:]), encoding="utf-8")
    index = tmp_path / "index"
    proc = run_module(["clara.index", "--checkpoint", str(checkpoint), "--corpus", str(corpus), "--out", str(index)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    server, url = start_server(checkpoint, index)
    questions = [q["question"] for q in read_jsonl(EXAMPLE / "end_to_end_data_eval.jsonl")[:8]]
    stop = threading.Event()
    statuses: list[int] = []

    def keep_asking(worker: int) -> None:
        with httpx.Client(timeout=120) as client:
            number = worker
            while not stop.is_set():
                body = {"model": "ck", "messages": [{"role": "user", "content": questions[number % len(questions)]}]}
                statuses.append(client.post(f"{url}/v1/chat/completions", json=body).status_code)
                found = client.post(f"{url}/v1/retrieve", json={"question": questions[0], "k": TOP_K})
                statuses.append(found.status_code)
                number += CLIENTS

    try:
        with ThreadPoolExecutor(CLIENTS) as pool:
            asking = [pool.submit(keep_asking, worker) for worker in range(CLIENTS)]
            while len(statuses) < 2 * CLIENTS:  # the load is on before the add starts
                time.sleep(0.1)
            proc = run_module(
                ["clara.index", "add", "--checkpoint", str(checkpoint), "--index", str(index), "--corpus", str(new)]
            )
            assert proc.returncode == 0, proc.stderr[-3000:]
            deadline = time.monotonic() + 60
            while httpx.get(f"{url}/health").json()["index_generation"] != 1 and time.monotonic() < deadline:
                time.sleep(0.2)
            answered_before_swap = len(statuses)
            while len(statuses) < answered_before_swap + 2 * CLIENTS:  # and requests go on after the swap
                time.sleep(0.1)
            stop.set()
            for future in asking:
                future.result()
        health = httpx.get(f"{url}/health").json()
        assert health["index_generation"] == 1 and health["documents"] == N_DOCS + N_NEW
        assert health["index_swaps"] == 1 and health["failed"] == 0
        assert statuses == [200] * len(statuses)  # no request failed, none was refused
        # After the swap every document can be cited, the new ones too.
        every = httpx.post(f"{url}/v1/retrieve", json={"question": questions[0], "k": N_DOCS + N_NEW}).json()
        assert {d["id"] for d in every["data"]} == {d["id"] for d in docs}
        added = {d["id"]: d["text"] for d in docs[N_DOCS:]}
        assert all(d["text"] == added[d["id"]] for d in every["data"] if d["id"] in added)
    finally:
        stop.set()
        server.terminate()
        output = server.communicate(timeout=30)[0]
    assert "Traceback" not in output and "not swapped" not in output, output
