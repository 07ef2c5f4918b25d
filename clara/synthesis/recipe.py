"""The synthesis recipe: the tasks an LLM is asked per document, the JSON each must answer with, and the filters
that drop what cannot train well.

The prompts are data (default_prompts.json, or a copy passed with --prompts); the answer schemas are code, since
the pipeline reads the fields they name. Every answer is parsed strictly: an unknown field, a missing one or a
wrong type makes the output malformed, and it is asked for again.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from clara.errors import ConfigError

DEFAULT_PROMPTS = Path(__file__).with_name("default_prompts.json")


class _Answer(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class QAPair(_Answer):
    question: str
    answer: str


class QAPairs(_Answer):
    pairs: list[QAPair]


class Paraphrase(_Answer):
    paraphrase: str


class Coverage(_Answer):
    uncovered_facts: list[str]
    pairs: list[QAPair]


class Judgement(_Answer):
    supported: list[bool] = Field(description="one entry per pair, in order")


# Task name -> the answer it must give. The names are also the json_schema names sent to the server.
SCHEMAS: dict[str, type[_Answer]] = {
    "simple_qa": QAPairs,
    "complex_qa": QAPairs,
    "paraphrase": Paraphrase,
    "coverage": Coverage,
    "judge": Judgement,
}
# What each task's user message must contain.
PLACEHOLDERS = {
    "simple_qa": ("{document}",),
    "complex_qa": ("{document}",),
    "paraphrase": ("{document}",),
    "coverage": ("{document}", "{pairs}"),
    "judge": ("{document}", "{pairs}"),
}
FILTER_TYPES = {
    "max_question_chars": int,
    "max_answer_chars": int,
    "min_answer_support": float,
    "max_paraphrase_ratio": float,
}


@dataclass(frozen=True)
class Filters:
    max_question_chars: int
    max_answer_chars: int
    min_answer_support: float  # share of an answer's words that must occur in the document
    max_paraphrase_ratio: float  # a paraphrase longer than this many times its document is dropped


@dataclass(frozen=True)
class Recipe:
    tasks: dict[str, dict[str, str]]  # task -> {"system": ..., "user": ...}
    filters: Filters
    text: str  # the file as read, hashed into the run's settings

    def messages(self, task: str, document: str, pairs: list[QAPair] = ()) -> list[dict]:
        listed = "\n".join(f"{i + 1}. Q: {p.question} A: {p.answer}" for i, p in enumerate(pairs)) or "(none)"
        user = self.tasks[task]["user"].replace("{document}", document).replace("{pairs}", listed)
        return [{"role": "system", "content": self.tasks[task]["system"]}, {"role": "user", "content": user}]


@functools.cache
def response_format(task: str) -> dict:
    """The OpenAI `response_format` asking for this task's JSON (enforced by vLLM and SGLang)."""
    return {
        "type": "json_schema",
        "json_schema": {"name": task, "strict": True, "schema": SCHEMAS[task].model_json_schema()},
    }


def load_recipe(path: str | None) -> Recipe:
    """The prompts file at `path` (default: the package's); a file that lacks a task, a message, a placeholder
    or a filter raises ConfigError naming it."""
    file = Path(path) if path else DEFAULT_PROMPTS
    try:
        text = file.read_text(encoding="utf-8")
        data = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError("prompts", str(file), f"a readable JSON prompts file ({error})") from None
    tasks = data.get("tasks") if isinstance(data, dict) else None
    if not isinstance(tasks, dict):
        raise ConfigError("prompts", str(file), "a JSON object with 'tasks' and 'filters'")
    for task, needed in PLACEHOLDERS.items():
        spec = tasks.get(task)
        if not (isinstance(spec, dict) and all(isinstance(spec.get(k), str) for k in ("system", "user"))):
            raise ConfigError("prompts", str(file), f"tasks.{task} with string 'system' and 'user' messages")
        missing = [p for p in needed if p not in spec["user"]]
        if missing:
            raise ConfigError("prompts", str(file), f"tasks.{task}.user containing {' and '.join(missing)}")
    filters = data.get("filters")
    if (
        not isinstance(filters, dict)
        or set(filters) != set(FILTER_TYPES)
        or not all(
            isinstance(filters[k], (int, float)) and not isinstance(filters[k], bool) and filters[k] >= 0
            for k in FILTER_TYPES
        )
    ):
        raise ConfigError("prompts", str(file), f"'filters' with the non-negative numbers {', '.join(FILTER_TYPES)}")
    return Recipe(
        {t: {"system": tasks[t]["system"], "user": tasks[t]["user"]} for t in SCHEMAS},
        Filters(**{k: FILTER_TYPES[k](v) for k, v in filters.items()}),
        text,
    )


def parse_answer(task: str, text: str) -> _Answer | None:
    """The answer parsed against its task's schema, or None when it is not exactly that JSON. A Markdown code
    fence around the JSON (common from chat models that were not constrained) is allowed."""
    body = text.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, re.DOTALL)
    try:
        return SCHEMAS[task].model_validate_json(fenced.group(1) if fenced else body)
    except ValidationError:
        return None


# -- filters ------------------------------------------------------------------------------------------------
WORD = re.compile(r"\w+", re.UNICODE)
# Words an answer may add to the document's without inventing anything.
FUNCTION_WORDS = frozenset(
    "a an the of in on at to for from by with and or but is are was were be been its it this that these those "
    "as than then so not no yes".split()
)


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def answer_support(answer: str, document_words: set[str]) -> float:
    """The share of the answer's content words found in the document (1.0 for an answer of function words)."""
    content = [w for w in words(answer) if w not in FUNCTION_WORDS]
    return sum(w in document_words for w in content) / len(content) if content else 1.0


def question_key(question: str) -> str:
    """Questions that differ only in case, spacing or punctuation are duplicates."""
    return " ".join(words(question))


def pair_problem(pair: QAPair, document_words: set[str], filters: Filters, seen: set[str]) -> str | None:
    """Why a pair cannot train well ("empty", "too_long", "unsupported", "duplicate"), or None to keep it;
    a kept pair's question joins `seen`."""
    if not pair.question.strip() or not pair.answer.strip():
        return "empty"
    if len(pair.question) > filters.max_question_chars or len(pair.answer) > filters.max_answer_chars:
        return "too_long"
    if answer_support(pair.answer, document_words) < filters.min_answer_support:
        return "unsupported"
    key = question_key(pair.question)
    if key in seen:
        return "duplicate"
    seen.add(key)
    return None


def paraphrase_problem(paraphrase: str, document: str, filters: Filters) -> str | None:
    if not paraphrase.strip():
        return "empty"
    if len(paraphrase) > filters.max_paraphrase_ratio * len(document) + 200:
        return "too_long"
    return None
