"""One document through the paper's recipe: simple QA pairs (one atomic fact each), complex QA pairs (several
facts joined) and a paraphrase, asked at once; then up to `rounds` coverage checks, each asking which facts no
pair covers yet and for pairs that cover them; then, optionally, the LLM as judge of every kept pair.

Every answer is parsed against its schema and asked for again when malformed (`parse_retries` times), then
skipped and counted. The result is a plain dict, stored in a shard file and turned into records later, with
everything the summary counts.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from dataclasses import dataclass

from clara.synthesis.llm import LLM, ChatRequest
from clara.synthesis.recipe import QAPair, Recipe, pair_problem, paraphrase_problem, parse_answer, words

PAIR_TASKS = ("simple_qa", "complex_qa", "coverage")


@dataclass(frozen=True)
class Asking:
    """What every document is asked with."""

    llm: LLM
    recipe: Recipe
    rounds: int
    parse_retries: int
    judge: bool
    seed: int


def request_seed(seed: int, doc_id: str, task: str, step: int, attempt: int) -> int:
    """A seed per request, the same in every run: servers that honour `seed` then sample the same answers."""
    key = f"{seed}:{doc_id}:{task}:{step}:{attempt}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "big")


class _Document:
    """The requests of one document and their counts."""

    def __init__(self, asking: Asking, doc_id: str, text: str):
        self.asking, self.doc_id, self.text = asking, doc_id, text
        self.document_words = set(words(text))
        self.seen: set[str] = set()
        self.counts = {"requests": 0, "malformed_retried": 0, "prompt_tokens": 0, "completion_tokens": 0}
        self.retried: Counter = Counter()
        self.rejected: Counter = Counter()
        self.proposed = 0  # pairs the LLM wrote, before the filters

    async def ask(self, task: str, step: int = 0, pairs: list[QAPair] = ()):
        """The parsed answer, or None when every try was malformed (counted as one rejected output)."""
        messages = self.asking.recipe.messages(task, self.text, pairs)
        for attempt in range(self.asking.parse_retries + 1):
            seed = request_seed(self.asking.seed, self.doc_id, task, step, attempt)
            reply = await self.asking.llm.chat(ChatRequest(task, messages, seed))
            self.counts["requests"] += 1
            self.counts["prompt_tokens"] += reply.prompt_tokens
            self.counts["completion_tokens"] += reply.completion_tokens
            self.retried.update(reply.retried)
            answer = parse_answer(task, reply.text) if reply.text is not None else None
            if answer is not None and (task != "judge" or len(answer.supported) == len(pairs)):
                return answer
            if attempt < self.asking.parse_retries:
                self.counts["malformed_retried"] += 1
        self.rejected["malformed"] += 1
        return None

    def keep(self, pairs: list[QAPair]) -> list[QAPair]:
        self.proposed += len(pairs)
        kept = []
        for pair in pairs:
            problem = pair_problem(pair, self.document_words, self.asking.recipe.filters, self.seen)
            if problem:
                self.rejected[problem] += 1
            else:
                kept.append(QAPair(question=pair.question.strip(), answer=pair.answer.strip()))
        return kept


async def synthesize_document(asking: Asking, doc_id: str, text: str) -> dict:
    """Everything the recipe makes of one document, and what it took."""
    doc = _Document(asking, doc_id, text)
    simple, complex_, paraphrase = await asyncio.gather(
        doc.ask("simple_qa"), doc.ask("complex_qa"), doc.ask("paraphrase")
    )
    found = {
        "simple_qa": doc.keep(simple.pairs) if simple else [],
        "complex_qa": doc.keep(complex_.pairs) if complex_ else [],
        "coverage": [],
    }
    rounds = 0
    while rounds < asking.rounds and (simple is not None or complex_ is not None):
        rounds += 1
        answer = await doc.ask("coverage", rounds, found["simple_qa"] + found["complex_qa"] + found["coverage"])
        new = doc.keep(answer.pairs) if answer else []
        found["coverage"] += new
        if not (answer and answer.uncovered_facts and new):
            break
    if asking.judge:
        await _judge(doc, found)
    kept_paraphrase = None
    if paraphrase is not None:
        problem = paraphrase_problem(paraphrase.paraphrase, text, asking.recipe.filters)
        if problem:
            doc.rejected[f"paraphrase_{problem}"] += 1
        else:
            kept_paraphrase = paraphrase.paraphrase.strip()
    return {
        "id": doc_id,
        "pairs": {task: [[p.question, p.answer] for p in found[task]] for task in PAIR_TASKS},
        "paraphrase": kept_paraphrase,
        "proposed_pairs": doc.proposed,
        "coverage_rounds": rounds,
        "answered_outputs": _answered(simple, complex_),
        **doc.counts,
        "retried": dict(doc.retried),
        "rejected": dict(doc.rejected),
    }


def _answered(*answers) -> int:
    """How many of the pair tasks gave a well-formed answer (none: the document is "no_valid_output")."""
    return sum(answer is not None for answer in answers)


async def _judge(doc: _Document, found: dict[str, list[QAPair]]) -> None:
    """Drop the pairs the LLM judges unsupported by the document; a malformed verdict keeps them all."""
    pairs = [pair for task in PAIR_TASKS for pair in found[task]]
    if not pairs:
        return
    verdict = await doc.ask("judge", pairs=pairs)
    if verdict is None:
        return
    supported = iter(verdict.supported)
    for task in PAIR_TASKS:
        keep = [next(supported) for _ in found[task]]
        if False in keep:
            doc.rejected["judged_unsupported"] += keep.count(False)
        found[task] = [pair for pair, ok in zip(found[task], keep) if ok]
