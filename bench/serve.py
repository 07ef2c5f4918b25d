"""Serving many users at once (clara.serving.__main__): the rows of `python -m bench --serve`.

The same server, started as a user starts it (`python -m clara.serve`, its own process), answers closed-loop
clients (each sends its next request when the previous one is answered) for a fixed time at each number of
concurrent clients: once batching requests that arrive together (--max_batch, --max_wait_ms) and once
answering one request at a time (max_batch 1). Every request is a greedy chat completion of --max_tokens
tokens over the example questions in turn, so batches mix different questions. Reported: requests per
second, p50 / p99 latency and failures (any non-200 answer or transport error). `--load SECONDS` instead runs
one long load with the largest number of clients against the batching server.

Without --checkpoint / --index, a stage2 checkpoint of the built-in tiny model (fresh adapters, so the
trained tiny base answers) and an index of --documents example documents are made in a temporary folder.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench --serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="stage2 checkpoint (default: the tiny model, made here)")
    parser.add_argument("--index", default=None, help="its index folder (default: made here from the example corpus)")
    parser.add_argument("--documents", type=int, default=400, help="example documents in the index made here")
    parser.add_argument("--clients", default="1,8,32", help="numbers of concurrent clients (default 1,8,32)")
    parser.add_argument("--seconds", type=float, default=15.0, help="seconds per row (default 15)")
    parser.add_argument(
        "--load",
        type=float,
        default=None,
        metavar="SECONDS",
        help="instead: one load of this many seconds with the largest number of clients, batching",
    )
    parser.add_argument("--max_tokens", type=int, default=16, help="answer tokens per request (default 16)")
    parser.add_argument("--max_batch", type=int, default=32, help="the batching server's --max_batch (default 32)")
    parser.add_argument("--max_wait_ms", type=float, default=10.0, help="its --max_wait_ms (default 10)")
    parser.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE")
    return parser


def make_model(folder: Path, documents: int) -> tuple[str, str]:
    """A tiny stage2 checkpoint and its index of the first example documents."""
    import torch

    from clara.index.build import build_index
    from clara.model.checkpoint import build_model, save_model
    from clara.model.model import ADAPTERS, ModelSettings

    settings = ModelSettings(
        base_model="tiny", n_mem_tokens=4, compress_rate=32, doc_max_length=128, generation_top_k=3
    )
    torch.manual_seed(0)
    model = build_model(settings, list(ADAPTERS))
    save_model(model, str(folder / "checkpoint"), "stage2")
    lines = (REPO / "example" / "corpus.jsonl").read_text(encoding="utf-8").splitlines()[:documents]
    docs = [json.loads(line) for line in lines]
    build_index(
        model.eval(),
        [d["id"] for d in docs],
        [d["text"] for d in docs],
        str(folder / "index"),
        show_progress=False,
        log=lambda *args: None,
    )
    return str(folder / "checkpoint"), str(folder / "index")


def start_server(
    checkpoint: str, index: str, port: int, max_batch: int, max_wait_ms: float, max_tokens: int
) -> tuple[subprocess.Popen, str]:
    from clara.ports import free_port

    port = port or free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "clara.serve",
            "--checkpoint",
            checkpoint,
            "--index",
            index,
            "--port",
            str(port),
            "--max_batch",
            str(max_batch),
            "--max_wait_ms",
            str(max_wait_ms),
            "--max_tokens",
            str(max_tokens),
            "--model_name",
            "bench",
        ],
        cwd=REPO,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            httpx.get(f"{url}/health", timeout=2).raise_for_status()
            return proc, url
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the server did not start (exit {proc.poll()})")


async def closed_loop(url: str, clients: int, seconds: float, questions: list[str]) -> dict:
    """Each client asks, waits for the answer, asks again, until the time is up; returns the figures."""
    latencies: list[float] = []
    failures: list[str] = []
    stop_at = time.monotonic() + seconds

    async def client(number: int, http: httpx.AsyncClient) -> None:
        asked = number
        while time.monotonic() < stop_at:
            body = {"model": "bench", "messages": [{"role": "user", "content": questions[asked % len(questions)]}]}
            asked += clients
            started = time.perf_counter()
            try:
                response = await http.post(f"{url}/v1/chat/completions", json=body)
                if response.status_code != 200:
                    failures.append(f"HTTP {response.status_code}: {response.text[:200]}")
                    continue
            except httpx.HTTPError as error:
                failures.append(f"{type(error).__name__}: {error}")
                continue
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await asyncio.gather(*(client(i, http) for i in range(clients)))
    elapsed = time.perf_counter() - started
    ordered = sorted(latencies) or [float("nan")]
    return {
        "clients": clients,
        "seconds": round(elapsed, 1),
        "requests": len(latencies),
        "failed": len(failures),
        "requests_per_s": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "first_failures": failures[:3],
    }


def measure(args: argparse.Namespace, checkpoint: str, index: str, questions: list[str]) -> list[dict]:
    counts = [int(c) for c in args.clients.split(",") if c]
    servers = [("batched", args.max_batch, args.max_wait_ms), ("one at a time", 1, 0.0)]
    if args.load:
        servers, counts = servers[:1], [max(counts)]
    rows = []
    for name, max_batch, wait in servers:
        proc, url = start_server(checkpoint, index, args.port, max_batch, wait, args.max_tokens)
        try:
            asyncio.run(closed_loop(url, 2, 3, questions))  # warm-up
            for clients in counts:
                before = httpx.get(f"{url}/health").json()
                row = asyncio.run(closed_loop(url, clients, args.load or args.seconds, questions))
                after = httpx.get(f"{url}/health").json()
                batches = max(1, after["batches"] - before["batches"])
                rows.append({"server": name, **row, "mean_batch": (after["requests"] - before["requests"]) / batches})
                print(format_row(rows[-1]), flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    return rows


def format_row(row: dict) -> str:
    return (
        f"| {row['server']} | {row['clients']} | {row['requests_per_s']:.1f} | {row['p50_ms']:.0f} | "
        f"{row['p99_ms']:.0f} | {row['mean_batch']:.1f} | {row['requests']} | {row['failed']} |"
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    questions = [
        json.loads(line)["question"]
        for line in (REPO / "example" / "end_to_end_data_eval.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, index = args.checkpoint, args.index
        if checkpoint is None or index is None:
            checkpoint, index = make_model(Path(tmp), args.documents)
        print(
            "| server | clients | requests/s | p50 ms | p99 ms | mean batch | requests | failed |\n"
            "|---|---|---|---|---|---|---|---|",
            flush=True,
        )
        rows = measure(args, checkpoint, index, questions)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return 1 if any(row["failed"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
