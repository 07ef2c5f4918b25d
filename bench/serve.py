"""Serving many users at once (clara.serving.__main__): the rows of `python -m bench --serve`.

The same server, started as a user starts it (`python -m clara.serve`, its own process), answers closed-loop
clients (each sends its next request when the previous one is answered) for a fixed time at each number of
concurrent clients and each answer length. Every request is a greedy, streamed chat completion of exactly
--max_tokens tokens (min_tokens equal to it, so that both engines write the same amount) over the example
questions in turn, so batches mix different questions. Reported: requests and output tokens per second,
p50 / p99 latency and time to first token, and failures (any non-200 answer or transport error).

--engine hf (the default) measures the in-process engine twice, batching requests that arrive together
(--max_batch, --max_wait_ms) and answering one at a time (max_batch 1); --engine hf,vllm measures each engine
once, batching, on the same checkpoint and index, and adds:
- the hf engine's cost per output token at tokens 16 and 256 of one answer (one client: from the arrival of its
  N-th token to its (N + 16)-th, over 16; the hf engine reads the prompt and the answer so far again for every
  window of --window_tokens);
- text RAG, the comparison users make: the same base without CLaRa's adapters, its heads padded as the
  generator's, answering from the same retrieved documents as plain text through vLLM (the client retrieves
  with the clara server's /v1/retrieve, then asks vLLM), beside CLaRa through vLLM: requests/s, time to first
  token and prompt tokens per request.
`--load SECONDS` instead runs one long load with the largest number of clients against the batching server.
Without --checkpoint / --index, a stage2 checkpoint of the built-in tiny model (fresh adapters, so the trained
tiny base answers; 256-token documents compressed 32 times, 8 memory tokens each) and an index of --documents
documents of 256 tokens (consecutive example documents joined) are made in a temporary folder.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.config import RETRIEVAL_STAGE

REPO = Path(__file__).resolve().parent.parent
DOC_TOKENS = 256  # the documents' length: CLaRa's doc_max_length, and what text RAG reads in full
COMPRESS_RATE = 32
TOKEN_COST_AT = (16, 256)  # answer tokens at which the per-token cost is measured


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench --serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="stage2 checkpoint (default: the tiny model, made here)")
    parser.add_argument("--index", default=None, help="its index folder (default: made here from the example corpus)")
    parser.add_argument("--documents", type=int, default=400, help="256-token documents in the index made here")
    parser.add_argument("--engine", default="hf", help="engines, comma-separated: hf, vllm (default hf)")
    parser.add_argument("--clients", default="1,8,32", help="numbers of concurrent clients (default 1,8,32)")
    parser.add_argument("--seconds", type=float, default=15.0, help="seconds per row (default 15)")
    parser.add_argument(
        "--load",
        type=float,
        default=None,
        metavar="SECONDS",
        help="instead: one load of this many seconds with the largest number of clients, batching",
    )
    parser.add_argument(
        "--max_tokens", default="16", help="answer tokens per request, comma-separated (default 16; e.g. 16,128)"
    )
    parser.add_argument("--max_batch", type=int, default=32, help="the batching server's --max_batch (default 32)")
    parser.add_argument("--max_wait_ms", type=float, default=10.0, help="its --max_wait_ms (default 10)")
    parser.add_argument(
        "--vllm_python",
        type=os.path.expanduser,
        default="~/.cache/clara/vllm-env/bin/python",
        help="vllm: the python of vLLM's environment (default: where scripts/make_vllm_env.sh makes it)",
    )
    parser.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE")
    return parser


def long_documents(count: int, tokenizer) -> list[dict]:
    """`count` documents of DOC_TOKENS tokens: consecutive example documents joined, cut at DOC_TOKENS."""
    lines = (REPO / "example" / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    docs = [json.loads(line) for line in lines]
    made = []
    for number in range(count):
        parts, at = [], number
        while len(tokenizer(" ".join(parts), add_special_tokens=False)["input_ids"]) < DOC_TOKENS:
            parts.append(docs[at % len(docs)]["text"])
            at += 1
        ids = tokenizer(" ".join(parts), add_special_tokens=False)["input_ids"][:DOC_TOKENS]
        made.append({"id": docs[number % len(docs)]["id"], "text": tokenizer.decode(ids)})
    return made


def make_model(folder: Path, documents: int) -> tuple[str, str]:
    """A tiny checkpoint of the stage with a query reasoner, and its index of `documents` 256-token documents."""
    import torch

    from clara.index.build import build_index
    from clara.model.checkpoint import build_model, save_model
    from clara.model.model import ADAPTERS, ModelSettings

    settings = ModelSettings(
        base_model="tiny",
        n_mem_tokens=DOC_TOKENS // COMPRESS_RATE,
        compress_rate=COMPRESS_RATE,
        doc_max_length=DOC_TOKENS,
        generation_top_k=3,
    )
    torch.manual_seed(0)
    model = build_model(settings, list(ADAPTERS))
    save_model(model, str(folder / "checkpoint"), RETRIEVAL_STAGE)
    docs = long_documents(documents, model.tokenizer)
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
    checkpoint: str, index: str, port: int, max_batch: int, max_wait_ms: float, extra: list[str]
) -> tuple[subprocess.Popen, str]:
    from clara.ports import free_port

    port = port or free_port()
    command = [sys.executable, "-m", "clara.serve", "--checkpoint", checkpoint, "--index", index]
    command += ["--port", str(port), "--max_batch", str(max_batch), "--max_wait_ms", str(max_wait_ms)]
    command += ["--model_name", "bench", *extra]
    proc = subprocess.Popen(command, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            httpx.get(f"{url}/health", timeout=2).raise_for_status()
            return proc, url
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the server did not start (exit {proc.poll()})")


async def streamed(
    http: httpx.AsyncClient, url: str, body: dict, headers: dict | None = None
) -> tuple[float, float, dict, list[float]]:
    """One streamed request: seconds to the first text and to the end, its usage, when each piece (~ a token) came."""
    started = time.perf_counter()
    arrivals, usage = [], {}
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with http.stream("POST", url, json=body, headers=headers) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"HTTP {reply.status_code}: {(await reply.aread())[:200]!r}")
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            choices = chunk.get("choices") or []
            if choices and (choices[0].get("text") or (choices[0].get("delta") or {}).get("content")):
                arrivals.append(time.perf_counter() - started)
            usage = chunk.get("usage") or usage
    end = time.perf_counter() - started
    return (arrivals[0] if arrivals else end), end, usage, arrivals


def chat_request(question: str, tokens: int) -> tuple[str, dict]:
    messages = [{"role": "user", "content": question}]
    return "/v1/chat/completions", {"model": "bench", "messages": messages, "max_tokens": tokens, "min_tokens": tokens}


async def closed_loop(url: str, clients: int, seconds: float, questions: list[str], tokens: int, ask=None) -> dict:
    """Each client asks, waits for the answer, asks again, until the time is up; returns the figures.
    ask(http, question) -> (first, end, usage) replaces the chat completion (text RAG)."""
    latencies, firsts, output_tokens, prompt_tokens = [], [], [], []  # seconds, seconds, tokens, tokens
    failures: list[str] = []
    stop_at = time.monotonic() + seconds

    async def chat(http: httpx.AsyncClient, question: str):
        path, body = chat_request(question, tokens)
        return (await streamed(http, f"{url}{path}", body))[:3]

    async def client(number: int, http: httpx.AsyncClient) -> None:
        asked = number
        while time.monotonic() < stop_at:
            question = questions[asked % len(questions)]
            asked += clients
            try:
                first, end, usage = await (ask or chat)(http, question)
            except (httpx.HTTPError, RuntimeError) as error:
                failures.append(f"{type(error).__name__}: {error}")
                continue
            latencies.append(end)
            firsts.append(first)
            output_tokens.append(usage.get("completion_tokens", 0))
            prompt_tokens.append(usage.get("prompt_tokens", 0))

    started = time.perf_counter()
    limits = httpx.Limits(max_connections=clients * 2, max_keepalive_connections=clients * 2)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await asyncio.gather(*(client(i, http) for i in range(clients)))
    elapsed = time.perf_counter() - started
    ordered = sorted(latencies) or [float("nan")]
    return {
        "clients": clients,
        "max_tokens": tokens,
        "seconds": round(elapsed, 1),
        "requests": len(latencies),
        "failed": len(failures),
        "requests_per_s": len(latencies) / elapsed,
        "output_tokens_per_s": sum(output_tokens) / elapsed,
        "prompt_tokens": statistics.mean(prompt_tokens) if prompt_tokens else float("nan"),
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "ttft_p50_ms": 1000 * statistics.median(firsts) if firsts else float("nan"),
        "first_failures": failures[:3],
    }


async def token_cost(url: str, question: str, points: tuple[int, ...], repeats: int = 3) -> dict[int, float]:
    """Milliseconds per output token at each point N of one answer: the time from its N-th token to its (N + 16)-th
    (a whole window of the hf engine), over 16, the fastest of `repeats` answers (the least disturbed by other work
    on the machine). A token's time is that of the piece of text holding it: the pieces are the tokens (vLLM), or
    nearly (the hf engine holds back whitespace), so token t is taken as piece t * pieces / tokens. Measured for the
    hf engine only: vLLM's server merges the tokens of a stream whose reader lags into one piece, and on a busy
    machine it does, so the pieces no longer time its tokens."""
    tokens = max(points) + 16
    path, body = chat_request(question, tokens)
    costs = {n: float("inf") for n in points}
    async with httpx.AsyncClient(timeout=600) as http:
        for _ in range(repeats):
            _, _, usage, arrivals = await streamed(http, f"{url}{path}", body)
            if usage.get("completion_tokens") != tokens:
                raise RuntimeError(f"an answer of {usage.get('completion_tokens')} tokens where {tokens} were asked")
            for n in points:
                spent = token_time(arrivals, n + 16, tokens) - token_time(arrivals, n, tokens)
                costs[n] = min(costs[n], 1000 * spent / 16)
    return costs


def token_time(arrivals: list[float], token: int, tokens: int) -> float:
    return arrivals[max(0, round(token * len(arrivals) / tokens) - 1)]


def measure_server(
    url: str, name: str, args: argparse.Namespace, counts: list[int], lengths: list[int], questions: list[str]
) -> list[dict]:
    rows = []
    asyncio.run(closed_loop(url, 2, 3, questions, lengths[0]))  # warm-up
    for tokens in lengths:
        for clients in counts:
            before = httpx.get(f"{url}/health").json()
            row = asyncio.run(closed_loop(url, clients, args.load or args.seconds, questions, tokens))
            after = httpx.get(f"{url}/health").json()
            batches = max(1, after["batches"] - before["batches"])
            rows.append({"server": name, **row, "mean_batch": (after["requests"] - before["requests"]) / batches})
            print(format_row(rows[-1]), flush=True)
    return rows


def measure(args: argparse.Namespace, checkpoint: str, index: str, questions: list[str], work: Path) -> dict:
    counts = [int(c) for c in args.clients.split(",") if c]
    lengths = [int(t) for t in args.max_tokens.split(",") if t]
    engines = [e for e in args.engine.split(",") if e]
    if engines == ["hf"]:
        servers = [("batched", "hf", args.max_batch, args.max_wait_ms), ("one at a time", "hf", 1, 0.0)]
    else:
        servers = [(engine, engine, args.max_batch, args.max_wait_ms) for engine in engines]
    if args.load:
        servers, counts, lengths = servers[:1], [max(counts)], lengths[:1]
    result = {"rows": [], "token_cost": [], "text_rag": []}
    for name, engine, max_batch, wait in servers:
        extra = ["--max_tokens", str(max(lengths)), "--max_tokens_limit", str(max(TOKEN_COST_AT) + 16)]
        if engine == "vllm":
            extra += ["--engine", "vllm", "--vllm_python", args.vllm_python, "--vllm_log", str(work / "vllm.log")]
        proc, url = start_server(checkpoint, index, args.port, max_batch, wait, extra)
        try:
            result["rows"] += measure_server(url, name, args, counts, lengths, questions)
            if engine == "hf" and len(engines) > 1:
                for at, cost in asyncio.run(token_cost(url, questions[0], TOKEN_COST_AT)).items():
                    result["token_cost"].append({"engine": engine, "token": at, "ms_per_token": cost})
                    print(f"{engine}: {cost:.2f} ms per output token at tokens {at} to {at + 16}", flush=True)
            if engine == "vllm":
                result["text_rag"] = compare_text_rag(url, checkpoint, args, counts, lengths[0], questions, work)
        finally:
            proc.terminate()
            proc.wait(timeout=120)
    return result


def compare_text_rag(
    clara_url: str,
    checkpoint: str,
    args: argparse.Namespace,
    counts: list[int],
    tokens: int,
    questions: list[str],
    work: Path,
) -> list[dict]:
    """CLaRa through vLLM beside text RAG through vLLM on the same base and the same retrieved documents."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from clara.model.checkpoint import read_config, resolve_base_path
    from clara.model.vllm_export import write_padded_base
    from clara.serving.vllm_engine import vllm_env
    from clara.vllm_server import VLLMServer

    base_path = resolve_base_path(read_config(checkpoint)["base_model"])
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    folder = str(work / "text_rag_base")
    write_padded_base(AutoModelForCausalLM.from_pretrained(base_path), tokenizer, folder)
    top_k = httpx.get(f"{clara_url}/health").json()["generation_top_k"]
    served = ["--dtype", "float32", "--enforce-eager", "--served-model-name", "base", "--generation-config", "vllm"]
    log = str(work / "text-rag-vllm.log")
    print(
        f"\nText RAG beside CLaRa, both through vLLM: {top_k} documents of {DOC_TOKENS} tokens per question "
        f"(CLaRa reads each as memory vectors, compressed {read_config(checkpoint)['compress_rate']} times)\n"
        "| server | clients | answer tokens | requests/s | first token p50 ms | p50 ms | prompt tokens | requests "
        "| failed |\n|---|---|---|---|---|---|---|---|---|",
        flush=True,
    )
    rows = []
    with VLLMServer(args.vllm_python, folder, served, log_path=log, env=vllm_env()) as server:
        asks = [("CLaRa (vLLM)", None), ("text RAG (vLLM)", text_rag_ask(clara_url, server, tokenizer, top_k, tokens))]
        for name, ask in asks:
            asyncio.run(closed_loop(clara_url, 2, 3, questions, tokens, ask))  # warm-up
            for clients in counts:
                row = asyncio.run(closed_loop(clara_url, clients, args.seconds, questions, tokens, ask))
                rows.append({"server": name, **row})
                print(format_rag_row(rows[-1]), flush=True)
    return rows


def text_rag_ask(clara_url: str, server, tokenizer, top_k: int, tokens: int):
    """Text RAG: retrieve (the clara server's /v1/retrieve), then ask the plain base through vLLM with the texts."""
    from clara.stages.prompts import SYSTEM_ANSWER, answer_user_message

    headers = {"Authorization": f"Bearer {server.api_key}"}

    async def ask(http: httpx.AsyncClient, question: str) -> tuple[float, float, dict]:
        started = time.perf_counter()
        found = await http.post(f"{clara_url}/v1/retrieve", json={"question": question, "k": top_k})
        found.raise_for_status()
        background = "\n".join(d["text"] for d in found.json()["data"])
        messages = [
            {"role": "system", "content": SYSTEM_ANSWER},
            {"role": "user", "content": answer_user_message(background, question)},
        ]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        body = {"model": "base", "prompt": prompt, "max_tokens": tokens, "min_tokens": tokens, "temperature": 0}
        retrieved = time.perf_counter() - started
        first, end, usage, _ = await streamed(http, f"{server.url}/completions", body, headers)
        return retrieved + first, retrieved + end, usage

    return ask


def format_row(row: dict) -> str:
    return (
        f"| {row['server']} | {row['clients']} | {row['max_tokens']} | {row['requests_per_s']:.1f} | "
        f"{row['output_tokens_per_s']:.0f} | {row['p50_ms']:.0f} | {row['p99_ms']:.0f} | {row['ttft_p50_ms']:.0f} | "
        f"{row['mean_batch']:.1f} | {row['requests']} | {row['failed']} |"
    )


def format_rag_row(row: dict) -> str:
    return (
        f"| {row['server']} | {row['clients']} | {row['max_tokens']} | {row['requests_per_s']:.1f} | "
        f"{row['ttft_p50_ms']:.0f} | {row['p50_ms']:.0f} | {row['prompt_tokens']:.0f} | {row['requests']} | "
        f"{row['failed']} |"
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
            "| server | clients | answer tokens | requests/s | output tokens/s | p50 ms | p99 ms | first token p50 ms "
            "| mean batch | requests | failed |\n|---|---|---|---|---|---|---|---|---|---|---|",
            flush=True,
        )
        result = measure(args, checkpoint, index, questions, Path(tmp))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2), encoding="utf-8")
    rows = result["rows"] + result["text_rag"]
    return 1 if any(row["failed"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
