"""clara/vllm_server.py with a stand-in for vLLM (tests/fake_vllm.py, which starts a process of its own): it
starts, answers with its key, and is stopped with its child when its parent (a small Python process started here)
ends normally, raises, gets Ctrl-C (SIGINT) or SIGTERM, or is killed with SIGKILL. No process of the stand-in may
outlive it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from clara.vllm_server import VLLMServer, VLLMStartError, descendants
from tests.helpers import REPO, subprocess_env

pytestmark = pytest.mark.slow

PARENT = """
import json, sys, time
from clara.vllm_server import VLLMServer
mode, python, log = sys.argv[1:]
with VLLMServer(python, "fake-model", log_path=log, timeout=60, grace=3) as server:
    print(json.dumps({"keeper": server.keeper.pid, "url": server.url, "key": server.api_key}), flush=True)
    if mode == "error":
        raise RuntimeError("the run failed")
    if mode != "exit":
        time.sleep(120)
"""


def stand_in(tmp_path: Path) -> str:
    """An executable that runs the stand-in as the given `python` would run vLLM."""
    script = tmp_path / "vllm-python"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{REPO / "tests" / "fake_vllm.py"}" "$@"\n')
    script.chmod(0o755)
    return str(script)


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by whoever adopted it, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def stand_in_pids(path: Path) -> dict[str, int]:
    return {kind: int(pid) for kind, pid in (line.split() for line in path.read_text().splitlines())}


def wait_gone(pids: list[int], seconds: float = 15.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := [pid for pid in pids if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.mark.parametrize("ending", ["exit", "error", "sigint", "sigterm", "sigkill"])
def test_the_server_and_its_child_stop_with_the_parent(tmp_path, ending):
    pids_file = tmp_path / "pids"
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, ending, stand_in(tmp_path), str(tmp_path / "vllm.log")],
        env=subprocess_env(FAKE_VLLM_PIDS=str(pids_file)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        started = json.loads(parent.stdout.readline() or "null")
        assert started, parent.communicate(timeout=30)
        stand_in_processes = stand_in_pids(pids_file)
        watched = [started["keeper"], *stand_in_processes.values()]
        if ending.startswith("sig"):
            # It answers, with its key only, while the parent lives.
            answer = httpx.get(f"{started['url']}/models", headers={"Authorization": f"Bearer {started['key']}"})
            assert answer.status_code == 200 and answer.json()["data"]
            assert httpx.get(f"{started['url']}/models").status_code == 401
            assert all(alive(pid) for pid in watched)
            parent.send_signal({"sigint": signal.SIGINT, "sigterm": signal.SIGTERM, "sigkill": signal.SIGKILL}[ending])
        status = parent.wait(timeout=30)
        # Ctrl-C: KeyboardInterrupt leaves the `with` block (which stops the server), then Python ends by SIGINT.
        assert status == {"exit": 0, "error": 1, "sigint": -2, "sigterm": -15, "sigkill": -9}[ending], (
            parent.stderr.read()
        )
        if ending == "error":
            assert "the run failed" in parent.stderr.read()
        assert wait_gone(watched) == [], (ending, stand_in_processes, (tmp_path / "vllm.log").read_text())
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_a_server_that_exits_early_is_one_error_with_its_log(tmp_path):
    server = VLLMServer(
        stand_in(tmp_path),
        "fake-model",
        log_path=str(tmp_path / "vllm.log"),
        timeout=30,
        grace=2,
        env=subprocess_env(FAKE_VLLM_EXIT="3"),
    )
    with pytest.raises(VLLMStartError, match=r"(?s)exited with status 3 .*failing as asked"):
        with server:
            pass
    assert server.keeper is None and not [pid for pid in descendants(os.getpid()) if "vllm" in command_line(pid)]


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_synthesize_with_vllm_starts_and_stops_it(tmp_path):
    """`clara.synthesize --llm vllm:MODEL --vllm_python PATH`: the run asks the stand-in with its key, writes the
    stages' files, and leaves no process of the stand-in behind."""
    corpus = tmp_path / "corpus.jsonl"
    lines = (REPO / "example" / "corpus.jsonl").read_text(encoding="utf-8").splitlines()[:6]
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    pids_file, out = tmp_path / "pids", tmp_path / "out"
    command = ["clara.synthesize", "--corpus", str(corpus), "--out", str(out), "--llm", "vllm:fake-model"]
    command += ["--vllm_python", stand_in(tmp_path), "--no_progress", "--eval_fraction", "0.2", "--candidates", "3"]
    result = subprocess.run(
        [sys.executable, "-m", *command],
        cwd=REPO,
        env=subprocess_env(FAKE_VLLM_PIDS=str(pids_file), FAKE_VLLM_CORPUS=str(corpus)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "vLLM ready at http://127.0.0.1:" in result.stdout and "vLLM stopped" in result.stdout
    assert (out / "stage1.jsonl").exists() and (out / "vllm.log").exists()
    assert wait_gone(list(stand_in_pids(pids_file).values())) == []

    refused = subprocess.run(
        [sys.executable, "-m", *command[:7], "--vllm_python", str(tmp_path / "missing")],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2 and "--vllm_python=" in refused.stderr.strip().splitlines()[-1], refused.stderr
