"""Run docs/tutorial.md as written: its bash blocks in order (each after the settings block), the `clara serve`
block in the background, then its python block against the server. The built-in tiny model, the stand-in LLM
(tests/fake_openai_server.py) and the CPU stand in for the page's base model, LLM and GPU, through the variables
of its settings block.

    python scripts/run_tutorial.py --out tutorial-run            # every stage's full schedule: the page's figures
    python scripts/run_tutorial.py --out DIR --max_steps 2       # what tests/end_to_end/test_tutorial.py runs

The commands run in OUT, which links to this checkout's example/, scripts/ and train_single_gpu.sh, so that their
relative paths hold. OUT/report.json holds each step's command, exit status and seconds, the client's output and
the evaluation's figures; the last lines printed are the page's figures table with the machine, date and commit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

from clara.files import write_json_atomic, write_text_atomic

REPO = Path(__file__).resolve().parent.parent
PAGE = REPO / "docs" / "tutorial.md"
LINKED = ("example", "scripts", "train_single_gpu.sh")
BLOCK = re.compile(r"^```(bash|python)\n(.*?)^```", re.MULTILINE | re.DOTALL)
FIGURES = ("open_recall@1", "open_recall@5", "open_exact_match", "recall@5", "exact_match")


def page_blocks(page: Path) -> tuple[str, list[str], str, str]:
    """The settings block, the bash blocks after it (but the server's), the server's block and the python block."""
    blocks = BLOCK.findall(page.read_text(encoding="utf-8"))
    bash = [code for language, code in blocks if language == "bash"]
    python = [code for language, code in blocks if language == "python"]
    serve = [code for code in bash if code.lstrip().startswith("clara serve")]
    if len(python) != 1 or len(serve) != 1 or len(bash) < 3:
        raise SystemExit(f"{page}: expected settings, steps, one `clara serve` block and one python block")
    return bash[0], [code for code in bash[1:] if code not in serve], serve[0], python[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor() or "unknown CPU",
    )
    flags = Path("/proc/cpuinfo").read_text()
    return f"{os.cpu_count()}-core {model}" + (" with AVX-512" if " avx512f" in flags else "")


def commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
    return head.strip() + (" (with uncommitted changes)" if dirty.strip() else "")


def wait_for(url: str, server: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.3)
    raise SystemExit(f"{url} did not answer within {seconds:.0f}s (exit status {server.poll()})")


def run_step(name: str, script: str, env: dict, out: Path, steps: list[dict]) -> None:
    started = time.monotonic()
    log = out / "logs" / f"{len(steps) + 1}-{name}.log"
    with open(log, "w", encoding="utf-8") as handle:
        proc = subprocess.run(
            ["bash", "-c", "set -eo pipefail\n" + script], cwd=out, env=env, stdout=handle, stderr=subprocess.STDOUT
        )
    steps.append({"step": name, "returncode": proc.returncode, "seconds": round(time.monotonic() - started, 1)})
    print(f"{name}: exit {proc.returncode} after {steps[-1]['seconds']}s (log: {log})", flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n" + log.read_text(encoding="utf-8")[-4000:])


def serve_and_ask(settings: str, serve_code: str, client_code: str, env: dict, out: Path, port: int) -> dict:
    """The server in the background (its log in OUT/logs/serve.log), the client's block against it."""
    with open(out / "logs" / "serve.log", "w", encoding="utf-8") as serve_log:
        server = subprocess.Popen(
            ["bash", "-c", settings + "\nexec " + serve_code.strip()],
            cwd=out,
            env=env,
            stdout=serve_log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for(f"http://127.0.0.1:{port}/health", server, 300)
            client = subprocess.run(
                [sys.executable, "-c", client_code], cwd=out, env=env, capture_output=True, text=True, timeout=300
            )
        finally:
            server.terminate()
            server.wait(timeout=60)
    print(f"ask: exit {client.returncode}", flush=True)
    if client.returncode != 0:
        raise SystemExit("the client failed:\n" + client.stdout + client.stderr)
    return {"step": "ask", "returncode": client.returncode, "output": client.stdout}


def main() -> None:
    parser = argparse.ArgumentParser(description="Run docs/tutorial.md with the tiny model and the stand-in LLM.")
    parser.add_argument("--out", required=True, help="work folder (created; the commands' outputs go there)")
    parser.add_argument("--max_steps", default="", help="MAX_STEPS for every stage (default: its MAX_EPOCHS)")
    parser.add_argument("--max_epochs", default="", help="MAX_EPOCHS for every stage (default: the trainer's)")
    parser.add_argument("--doc_max_length", default="64", help="DOC_MAX_LENGTH (default 64)")
    args = parser.parse_args()
    settings, steps_code, serve_code, client_code = page_blocks(PAGE)
    out = Path(args.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        if not (out / name).exists():
            (out / name).symlink_to(REPO / name)

    llm_port, port = free_port(), free_port()
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(
        MODEL_PATH="tiny",
        DOC_MAX_LENGTH=args.doc_max_length,
        LLM=f"openai:http://127.0.0.1:{llm_port}/v1",
        LLM_ARGS="--model fake-llm --no_progress",
        MAX_STEPS=args.max_steps,
        MAX_EPOCHS=args.max_epochs,
        PORT=str(port),
        CUDA_VISIBLE_DEVICES="",
        NO_COLOR="1",
        PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}",
    )
    started, code_version = time.monotonic(), commit()  # the code that runs: later edits do not change it
    steps: list[dict] = []
    stand_in = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "fake_openai_server.py"), "--port", str(llm_port), "--delay", "0"],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_for(f"http://127.0.0.1:{llm_port}/health", stand_in, 60)
        names = ("synthesize", "train", "index-and-evaluate")
        for name, code in zip(names, steps_code, strict=True):
            run_step(name, settings + "\n" + code, env, out, steps)
        steps.append(serve_and_ask(settings, serve_code, client_code, env, out, port))
    finally:
        stand_in.terminate()
        stand_in.wait(timeout=60)
    metrics = json.loads((out / "results" / "stage2_eval.summary.json").read_text(encoding="utf-8"))["metrics"]
    report = {
        "machine": machine(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": code_version,
        "command": " ".join(["python scripts/run_tutorial.py", *sys.argv[1:]]),
        "seconds": round(time.monotonic() - started, 1),
        "steps": steps,
        "figures": {key: metrics.get(key) for key in FIGURES},
        "held_out_questions": metrics.get("open_retrieval_samples"),
        "passages": json.loads((out / "data" / "passages.json").read_text(encoding="utf-8"))["corpus"]["passages"],
    }
    write_json_atomic(str(out / "report.json"), report)
    table = figures_table(report)
    write_text_atomic(str(out / "figures.md"), table)
    print(steps[-1]["output"] + "\n" + table)


def figures_table(report: dict) -> str:
    def percent(key: str) -> str:
        value = report["figures"][key]
        return "n/a" if value is None else f"{100 * value:.0f}%"

    return (
        "| held-out questions | passages in the index | recall@1 | recall@5 (gold passage, whole index) | "
        "EM (answers from the index) | recall@5 among own 20 candidates | EM (from own candidates) |\n"
        "|---|---|---|---|---|---|---|\n"
        f"| {report['held_out_questions']} | {report['passages']} | {percent('open_recall@1')} | "
        f"{percent('open_recall@5')} | {percent('open_exact_match')} | {percent('recall@5')} | "
        f"{percent('exact_match')} |\n\n"
        f"Machine: {report['machine']}; date: {report['date']}; commit: {report['commit']}; command: "
        f"`{report['command']}` ({report['seconds'] / 60:.0f} minutes).\n"
    )


if __name__ == "__main__":
    main()
