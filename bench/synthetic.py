"""Synthetic training records of a stage's input format, with texts of the asked token lengths."""

from __future__ import annotations

import json
import random

from bench.config import BenchConfig


class SyntheticRecords:
    """Records of the stage's input format with texts of the asked token lengths, from the example words."""

    def __init__(self, cfg: BenchConfig, tokenizer):
        from clara.training.tiny import EXAMPLE_DIR

        self.cfg = cfg
        self.stage = cfg.stage_spec
        self.tokenizer = tokenizer
        self.rng = random.Random(cfg.seed)
        words = set()
        for path in sorted(EXAMPLE_DIR.glob("*.jsonl")):
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    for text in json.loads(line).get("docs", []):
                        words.update(text.split())
        self.words = sorted(words) or ["lorem", "ipsum", "dolor", "sit", "amet"]

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def text(self, tokens: int) -> str:
        """A text of at least `tokens` tokens (a document: more, and collate cuts it to DOC_MAX_LENGTH)."""
        words = []
        while True:
            words += [self.rng.choice(self.words) for _ in range(max(4, (tokens - self.count(" ".join(words))) // 2))]
            text = " ".join(words)
            if self.count(text) >= tokens:
                return text

    def short_text(self, tokens: int) -> str:
        """About `tokens` tokens: words are added until the count is reached."""
        words = []
        while not words or self.count(" ".join(words)) < tokens:
            words.append(self.rng.choice(self.words))
        return " ".join(words)

    def record(self) -> dict:
        from clara.data.records import normalise

        cfg, stage = self.cfg, self.stage
        docs = [self.text(cfg.doc_max_length + 3) for _ in range(cfg.docs_per_sample)]
        question, answer = self.short_text(cfg.question_tokens) + "?", self.short_text(cfg.answer_tokens)
        if stage.schema == "stage1":
            raw = {"data_type": "qa", "question": [question], "answers": [answer], "docs": docs}
        else:
            raw = {"question": question, "answer": answer, "docs": docs}
            if stage.uses_query:
                raw["pos_index"] = [0]
        return normalise(stage, raw, min_docs=stage.min_docs(cfg.top_k))

    def records(self, count: int) -> list[dict]:
        return [self.record() for _ in range(count)]
