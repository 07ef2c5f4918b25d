"""A stand-in for vLLM's OpenAI server, run the way clara.vllm_server runs vLLM:

    fake_vllm.py -m vllm.entrypoints.openai.api_server --model M --host 127.0.0.1 --port P [...]

(the tests pass a script that runs it as `--vllm_python`). It serves tests/fake_openai_server.py's answers over
the corpus in $FAKE_VLLM_CORPUS (default: the example corpus) with the key in $VLLM_API_KEY, and, as vLLM does
with its engine, starts a process of its own; it appends "server PID" and "child PID" lines to $FAKE_VLLM_PIDS,
so that a test can check that none of them outlives the run. $FAKE_VLLM_EXIT set: exits with that status at once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fake_openai_server import FakeOpenAI  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-m", dest="module", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    args, _ = parser.parse_known_args()
    assert args.module == "vllm.entrypoints.openai.api_server" and args.host == "127.0.0.1", sys.argv
    if os.environ.get("FAKE_VLLM_EXIT"):
        print("fake vLLM: failing as asked", file=sys.stderr, flush=True)
        sys.exit(int(os.environ["FAKE_VLLM_EXIT"]))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    if os.environ.get("FAKE_VLLM_PIDS"):
        with open(os.environ["FAKE_VLLM_PIDS"], "a", encoding="utf-8") as handle:
            handle.write(f"server {os.getpid()}\nchild {child.pid}\n")
    corpus_path = os.environ.get("FAKE_VLLM_CORPUS") or str(
        Path(__file__).resolve().parent.parent / "example/corpus.jsonl"
    )
    with open(corpus_path, encoding="utf-8") as handle:
        corpus = {str(r["id"]): r["text"] for r in map(json.loads, handle)}
    fake = FakeOpenAI(corpus, port=args.port, api_key=os.environ.get("VLLM_API_KEY"))
    print(f"fake vLLM serving {args.model} at {fake.url}", file=sys.stderr, flush=True)
    fake.httpd.serve_forever()


if __name__ == "__main__":
    main()
