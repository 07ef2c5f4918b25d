"""A small OpenAI-compatible chat server for the synthesis tests, on 127.0.0.1, that injects faults.

It validates every request with clara.openai_protocol (a bad one is a 400, as from a real server) and answers
the synthesis tasks (named by the request's json_schema) with completions templated from the documents of the
example corpus ("Vorlan is a kingdom. Its sacred animal is owl. ..."): every fact but the last in the simple
pairs, one complex pair, a paraphrase, the last fact in the first coverage round, nothing in the second.

A fault is chosen by (document, task, attempt), attempt counting this server's earlier requests for the same
document and task, so the same faults hit the same requests at any concurrency:
malformed (an answer that is not JSON), 429, 500, slow (past the client's timeout), drop (the connection closed
without an answer), 401.

    python tests/fake_openai_server.py --corpus example/corpus.jsonl --delay 0.2 --port 8000
serves the example corpus answering after 200 ms (the README's throughput figures).
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from pydantic import ValidationError

from clara.index.corpus import content_id
from clara.openai_protocol import ChatCompletion, ChatCompletionRequest, ChatMessage, Choice, OpenAIError, Usage

FACT = re.compile(r"Its (.+?) is (.+?)\.")
PLACE = re.compile(r"(?:^|(?<=\s))([A-Z]\w+) is an? (\w+)\.")
# Where the document ends in every task's user message (clara/synthesis/default_prompts.json).
DOCUMENT = re.compile(r"Document:\n(.*?)\n\n(?=Write |Rewrite |Question-answer pairs)", re.DOTALL)


def places(document: str) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """(name, kind, facts) of each place a document (or a passage of several places) describes, in order."""
    starts = list(PLACE.finditer(document))
    found = []
    for match, after in zip(starts, starts[1:] + [None]):
        body = document[match.end() : after.start() if after else len(document)]
        found.append((match.group(1), match.group(2), FACT.findall(body)))
    return found


def templated_answer(task: str, document: str, user: str) -> dict:
    """The answer a good LLM could give for a document (or passage) in the example corpus's language."""
    described = places(document)
    if not described:  # a passage cut inside a place's description: nothing a question could name
        if task == "paraphrase":
            return {"paraphrase": document}
        return {"uncovered_facts": [], "pairs": []} if task == "coverage" else {"pairs": []}
    every_fact = [(name, attr, value) for name, _, facts in described for attr, value in facts]
    pairs = [{"question": f"What is the {attr} of {name}?", "answer": value} for name, attr, value in every_fact]
    name, kind, facts = described[0]
    if task == "simple_qa":
        return {"pairs": [{"question": f"What kind of place is {name}?", "answer": kind}] + pairs[:-1]}
    if task == "complex_qa":
        (a1, v1), (a2, v2) = facts[:2]
        return {"pairs": [{"question": f"What are the {a1} and the {a2} of {name}?", "answer": f"{v1} and {v2}"}]}
    if task == "paraphrase":
        return {
            "paraphrase": " ".join(
                f"{name}, {'an' if kind[0] in 'aeiou' else 'a'} {kind}, has these: "
                + "; ".join(f"{value} as its {attr}" for attr, value in reversed(facts))
                + "."
                for name, kind, facts in described
            )
        }
    if task == "coverage":
        last = pairs[-1]
        if last["question"] in user:
            return {"uncovered_facts": [], "pairs": []}
        _, attr, value = every_fact[-1]
        return {"uncovered_facts": [f"Its {attr} is {value}."], "pairs": [last]}
    if task == "judge":  # the complex pairs are judged unsupported
        return {"supported": [" and the " not in q for q in re.findall(r"^\d+\. Q: (.*) A: ", user, re.MULTILINE)]}
    raise ValueError(task)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # 32 clients connecting at once must not be refused


class FakeOpenAI:
    """`faults[(doc_id, task, attempt)]` is one of the fault names above; `delay` seconds pass before each answer;
    `fixed[task]` replaces the templated answers of a task."""

    def __init__(
        self,
        corpus: dict[str, str],
        faults: dict | None = None,
        delay: float = 0.0,
        slow_seconds: float = 3.0,
        port: int = 0,
        fixed: dict[str, dict] | None = None,
        api_key: str | None = None,
    ):
        self.api_key = api_key  # set: every request must carry `Authorization: Bearer KEY` (else 401), as vLLM's
        self.doc_of = {text: doc_id for doc_id, text in corpus.items()}
        self.fixed = fixed or {}  # task -> the answer it always gets, instead of the templated one
        self.faults, self.delay, self.slow_seconds = faults or {}, delay, slow_seconds
        self.attempts: Counter = Counter()
        self.served: Counter = Counter()  # fault name or "ok" -> requests
        self.lock = threading.Lock()
        self.httpd = _Server(("127.0.0.1", port), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> FakeOpenAI:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def document(self, user: str) -> tuple[str, str]:
        """(id, text) of the document asked about: its corpus id, or a content id for a passage of a folder."""
        text = DOCUMENT.match(user).group(1)
        return self.doc_of.get(text) or content_id(text), text

    def answer(self, body: bytes) -> tuple[int, dict | None, str]:
        """(status, JSON body or None to drop the connection, fault served)."""
        try:
            request = ChatCompletionRequest.model_validate_json(body)
        except ValidationError as error:
            return 400, OpenAIError.from_validation(error).body(), "bad_request"
        task = request.response_format["json_schema"]["name"]
        user = request.messages[-1].content
        doc_id, text = self.document(user)
        with self.lock:
            attempt = self.attempts[(doc_id, task)]
            self.attempts[(doc_id, task)] += 1
        fault = self.faults.get((doc_id, task, attempt), "ok")
        if fault in ("429", "500", "401"):
            return int(fault), OpenAIError(int(fault), f"injected {fault}").body(), fault
        if fault == "drop":
            return 0, None, fault
        if fault == "slow":
            time.sleep(self.slow_seconds)
        answer = self.fixed[task] if task in self.fixed else templated_answer(task, text, user)
        content = '{"pairs": [oops' if fault == "malformed" else json.dumps(answer)
        prompt_tokens = sum(len(m.content.split()) for m in request.messages)
        completion = ChatCompletion(
            id=f"chatcmpl-{doc_id}-{task}-{attempt}",
            created=0,
            model=request.model,
            choices=[Choice(message=ChatMessage(role="assistant", content=content))],
            usage=Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=len(content.split()),
                total_tokens=prompt_tokens + len(content.split()),
            ),
        )
        return 200, completion.model_dump(), fault

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def send_json(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def authorized(self) -> bool:
                if server.api_key is None or self.headers.get("Authorization") == f"Bearer {server.api_key}":
                    return True
                self.send_json(401, OpenAIError(401, "invalid API key").body())
                return False

            def do_GET(self):  # /health (open, as vLLM's) and /v1/models
                if self.path == "/health":
                    self.send_json(200, {})
                elif self.path == "/v1/models" and self.authorized():
                    self.send_json(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})
                elif self.path != "/v1/models":
                    self.send_json(404, OpenAIError(404, f"no {self.path}").body())

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if not self.authorized():
                    return
                if server.delay:
                    time.sleep(server.delay)
                status, payload, fault = server.answer(body)
                with server.lock:
                    server.served[fault] += 1
                if payload is None:
                    self.close_connection = True
                    return
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting (a slow answer)
                    self.close_connection = True

            def log_message(self, *args):
                pass

        return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the fake OpenAI-compatible LLM over a corpus.")
    parser.add_argument(
        "--corpus", default=None, help="JSONL corpus whose ids name the documents (default: content ids)"
    )
    parser.add_argument("--delay", type=float, default=0.2, help="seconds before each answer")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    corpus = {}
    if args.corpus:
        with open(args.corpus, encoding="utf-8") as handle:
            corpus = {str(r["id"]): r["text"] for r in map(json.loads, handle)}
    fake = FakeOpenAI(corpus, delay=args.delay, port=args.port)
    print(f"serving {len(corpus)} documents at {fake.url}", flush=True)
    fake.httpd.serve_forever()


if __name__ == "__main__":
    main()
