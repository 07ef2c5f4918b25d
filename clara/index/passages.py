"""Documents cut into passages the compressor reads whole: at most DOC_MAX_LENGTH tokens of its tokenizer each, cut on
paragraph boundaries where they fit, else on sentence boundaries, else between words (a single word longer than the
limit, between characters), with an optional overlap: a passage may start with the last of these pieces of the one
before.

The compressor keeps the first DOC_MAX_LENGTH tokens of what it is given (clara.model.collate.encode_documents), so
a longer text would be indexed, and asked about in synthesis, from its beginning only. Synthesis, the index and
every corpus reader split with split_documents, and the passages file records the tokenizer and length they were
cut for, so that an index is refused passages cut for another compressor.

A document that fits in one passage keeps its id; a longer one's passages are `DOCID#1`, `DOCID#2`, ...
(document_of maps them back, for open-corpus recall by document).

Standard library only at import: the tokenizer is loaded (transformers) only when a command asks for one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from clara.errors import DataError
from clara.files import write_json_atomic
from clara.index.corpus import load_corpus

PASSAGES_FILE = "passages.json"
PASSAGES_FORMAT = "clara-passages"
# Text whose token ids stand for a tokenizer's splitting of words, numbers, punctuation and accents: two tokenizers
# that count these the same way (a base and a checkpoint that only added CLaRa's tokens to it) cut the same passages.
PROBE_TEXT = (
    "Vorlan is a kingdom. Its sacred animal is owl; its lucky number is 42,000 (forty-two thousand).\n\n"
    "Zürich's café serves crème brûlée — naïve façade, 東京, Ελλάδα, «quotes», emoji 🙂 and tabs\there."
)
PARAGRAPH = re.compile(r"\n\s*\n")
SENTENCE_END = re.compile(r"(?<=[.!?。！？])[\"'”’)\]]*\s+")
WORD = re.compile(r"\S+")

Counter = Callable[[list[str]], list[int]]  # token counts of texts, in one call (a fast tokenizer batches them)


@dataclass(frozen=True)
class Passage:
    id: str
    document: str
    position: int  # 1-based, in its document
    text: str


@dataclass(frozen=True)
class Cut:
    """What passages are cut for: the tokenizer (as given, and its key) and the most tokens a passage may hold."""

    tokenizer: str
    tokenizer_key: str
    doc_max_length: int
    overlap: int

    def describe(self) -> str:
        return f"tokenizer {self.tokenizer} (key {self.tokenizer_key}), DOC_MAX_LENGTH={self.doc_max_length}"


def tokenizer_key(tokenizer) -> str:
    """16 hex digits standing for how a tokenizer counts ordinary text (its base vocabulary and its ids of
    PROBE_TEXT); added special tokens do not change it."""
    ids = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    return hashlib.sha256(json.dumps([tokenizer.vocab_size, ids]).encode()).hexdigest()[:16]


def token_counter(tokenizer) -> Counter:
    def count(texts: list[str]) -> list[int]:
        if not texts:
            return []
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]

    return count


def load_tokenizer(source: str):
    """A base model's or checkpoint's tokenizer (a folder or a Hub id), or the built-in tiny model's (`tiny`)."""
    from clara.model.tokenizer import load_tokenizer as load_saved  # deferred: reading a corpus loads no model code

    try:
        return load_saved(source)
    except OSError as error:
        raise DataError(
            f"--tokenizer {source}: no tokenizer there (expected `tiny`, a base model's Hub id or folder, or a "
            f"checkpoint folder): {str(error).splitlines()[0]}"
        ) from error


def _spans(text: str, pattern: re.Pattern, start: int, end: int) -> list[tuple[int, int]]:
    """The stripped pieces of text[start:end] between matches of pattern, as (start, end)."""
    pieces, at = [], start
    for match in pattern.finditer(text, start, end):
        pieces.append((at, match.start()))
        at = match.end()
    pieces.append((at, end))
    return [_strip(text, a, b) for a, b in pieces if text[a:b].strip()]


def _strip(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _words(text: str, start: int, end: int) -> list[tuple[int, int]]:
    return [(start + m.start(), start + m.end()) for m in WORD.finditer(text[start:end])]


def _characters(text: str, start: int, end: int, count: Counter, limit: int) -> list[tuple[int, int]]:
    """A word longer than limit tokens, in the longest pieces that fit (a binary search per piece)."""
    pieces = []
    while start < end:
        low, high = start + 1, end
        while low < high:
            middle = (low + high + 1) // 2
            if count([text[start:middle]])[0] <= limit:
                low = middle
            else:
                high = middle - 1
        pieces.append((start, low))
        start = low
    return pieces


def _units(text: str, count: Counter, limit: int) -> list[tuple[tuple[int, int], int]]:
    """The text as ((start, end), tokens) pieces of at most limit tokens each: paragraphs, or the sentences of a
    paragraph that does not fit, or the words of a sentence that does not fit."""
    levels = (
        lambda a, b: _spans(text, PARAGRAPH, a, b),
        lambda a, b: _spans(text, SENTENCE_END, a, b),
        lambda a, b: _words(text, a, b),
        lambda a, b: _characters(text, a, b, count, limit),
    )

    def cut(spans: list[tuple[int, int]], level: int) -> list[tuple[tuple[int, int], int]]:
        tokens = count([text[a:b] for a, b in spans])
        units = []
        for span, n in zip(spans, tokens):
            if n <= limit or level + 1 == len(levels):
                units.append((span, n))
            else:
                units += cut(levels[level + 1](*span), level + 1)
        return units

    return cut(levels[0](0, len(text)), 0)


def split_text(text: str, count: Counter, limit: int, overlap: int = 0) -> list[str]:
    """Passages of at most limit tokens (as count counts them) covering the text in order; each after the first
    starts with the last pieces of the one before, up to overlap tokens."""
    if count([text])[0] <= limit:
        return [text.strip()]
    units = _units(text, count, limit)
    passages: list[str] = []
    first = 0
    while first < len(units):
        # Joined pieces take about the sum of their tokens; the real count of the joined text decides.
        last, total = first, units[first][1]
        while last + 1 < len(units) and total + units[last + 1][1] <= limit:
            last += 1
            total += units[last][1]
        while last > first and count([text[units[first][0][0] : units[last][0][1]]])[0] > limit:
            last -= 1
        passages.append(text[units[first][0][0] : units[last][0][1]])
        if last + 1 == len(units):
            break
        start, kept = last + 1, 0
        while start - 1 > first and kept + units[start - 1][1] <= overlap:
            start -= 1
            kept += units[start][1]
        first = start
    return passages


def split_documents(ids: list[str], texts: list[str], count: Counter, limit: int, overlap: int = 0) -> list[Passage]:
    """Every document's passages, in order: one passage keeps the document's id, more are DOCID#1, DOCID#2, ..."""
    passages = []
    for doc_id, text in zip(ids, texts):
        pieces = split_text(text, count, limit, overlap)
        for position, piece in enumerate(pieces, start=1):
            passage_id = doc_id if len(pieces) == 1 else f"{doc_id}#{position}"
            passages.append(Passage(passage_id, doc_id, position, piece))
    return passages


def document_of(passage_id: str) -> str:
    """The document a passage id belongs to (`guide.md#3` -> `guide.md`; an id without `#N` is its own)."""
    head, mark, tail = passage_id.rpartition("#")
    return head if mark and tail.isdigit() else passage_id


def write_passages(path: str, cut: Cut, passages: list[Passage], corpus: dict) -> None:
    """The passages file: what they were cut for, what the corpus held (files read and skipped) and every passage."""
    write_json_atomic(
        path,
        {
            "format": PASSAGES_FORMAT,
            **asdict(cut),
            "corpus": corpus,
            "passages": [asdict(p) for p in passages],
        },
    )


def is_passages_file(path: str) -> bool:
    return os.path.isfile(path) and os.path.basename(path).endswith(".json") and _peek_format(path)


def _peek_format(path: str) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(200)
    return f'"format": "{PASSAGES_FORMAT}"'.encode() in head


def read_passages(path: str) -> tuple[Cut, list[Passage], dict]:
    """What a passages file's passages were cut for, the passages, and the corpus summary it recorded."""
    try:
        with open(path, encoding="utf-8") as handle:
            saved = json.load(handle)
        cut = Cut(saved["tokenizer"], saved["tokenizer_key"], saved["doc_max_length"], saved["overlap"])
        passages = [Passage(**p) for p in saved["passages"]]
        corpus = dict(saved["corpus"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(
            f"{path}: not a readable passages file ({error}); write it again with clara synthesize"
        ) from error
    return cut, passages, corpus


def check_cut(path: str, saved: Cut, wanted: Cut) -> None:
    """A passages file is used only with the tokenizer and length it was cut for."""
    if saved.tokenizer_key != wanted.tokenizer_key or saved.doc_max_length != wanted.doc_max_length:
        raise DataError(
            f"{path}: its passages were cut for {saved.describe()}, but they would be read by {wanted.describe()}; "
            "split the corpus again for this one (pass the documents, not the passages file), or synthesize with "
            "its tokenizer and DOC_MAX_LENGTH"
        )


def cut_corpus(ids: list[str], texts: list[str], corpus: dict, tokenizer, cut: Cut) -> tuple[list[Passage], dict]:
    """The corpus's passages for cut, and the corpus summary with the passages per document added."""
    passages = split_documents(ids, texts, token_counter(tokenizer), cut.doc_max_length, cut.overlap)
    per_document: dict[str, int] = {}
    for passage in passages:
        per_document[passage.document] = per_document.get(passage.document, 0) + 1
    return passages, {**corpus, "passages": len(passages), "passages_per_document": per_document}


def describe_corpus(corpus: dict, cut: Cut) -> str:
    """One line: files read and skipped, documents split, passages and what they were cut for."""
    split = sum(n > 1 for n in corpus["passages_per_document"].values())
    files = f"{corpus['read']} of {corpus['files']} files read ({len(corpus['skipped'])} skipped)"
    return (
        f"{corpus['path']}: {files}; {len(corpus['passages_per_document'])} documents, {split} of them split, into "
        f"{corpus['passages']} passages of at most {cut.doc_max_length} tokens ({cut.tokenizer}, overlap "
        f"{cut.overlap})"
    )


@dataclass
class Source:
    """What --corpus held: documents to cut (a corpus file or folder), or the passages of a passages file and the
    cut they were made for."""

    path: str
    corpus: dict
    ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    cut: Cut | None = None
    passages: list[Passage] = field(default_factory=list)


def read_source(path: str) -> Source:
    """Read --corpus before a model is loaded, so that a bad corpus is reported at once."""
    if is_passages_file(path):
        cut, passages, corpus = read_passages(path)
        return Source(path, corpus, cut=cut, passages=passages)
    ids, texts, corpus = load_corpus(path)
    return Source(path, corpus, ids, texts)


def source_passages(source: Source, tokenizer, wanted: Cut) -> tuple[list[Passage], dict, Cut]:
    """The documents cut for wanted, or a passages file's passages when they were cut for the same tokenizer and
    length (else DataError naming both); the corpus summary; the cut the passages have."""
    if source.cut is not None:
        check_cut(source.path, source.cut, wanted)
        return source.passages, source.corpus, source.cut
    passages, corpus = cut_corpus(source.ids, source.texts, source.corpus, tokenizer, wanted)
    return passages, corpus, wanted


def count_longer(tokenizer, texts: list[str], doc_max_length: int) -> int:
    """How many texts are longer than the compressor reads (an index records it as it stores them)."""
    return sum(n > doc_max_length for n in token_counter(tokenizer)(texts))


def longer_than_read(tokenizer, texts: list[str], doc_max_length: int, what: str) -> str | None:
    """A line saying how many texts the compressor reads only the beginning of (None when it reads them all): the
    commands that compress documents they did not cut say so, as the trainer does."""
    return describe_longer(count_longer(tokenizer, texts, doc_max_length), len(texts), doc_max_length, what)


def describe_longer(longer: int, total: int, doc_max_length: int, what: str) -> str | None:
    """The line of longer_than_read from counts (an index's are in its index.json)."""
    if not longer:
        return None
    return (
        f"{longer} of {total} {what} are longer than DOC_MAX_LENGTH={doc_max_length} tokens: the compressor "
        f"reads the first {doc_max_length} tokens of each (cut them into passages: clara synthesize --tokenizer, or "
        "clara index --corpus with the documents)"
    )
