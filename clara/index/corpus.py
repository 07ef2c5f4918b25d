"""The corpus format that python -m clara.index and python -m clara.synthesize read: `{"id": ..., "text": ...}`
per line, or records with a `docs` list (any stage's data), whose documents get content ids (`doc-` and 16 hex
digits of the text's SHA-256) and are kept once however often they occur; or a folder of files (clara.index.folder).

Standard library only: a command that reads a corpus without a model (clara.synthesis.__main__ with a server) starts
without loading torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator

from clara.errors import DataError
from clara.index.folder import read_folder

MAX_REPORTED_ERRORS = 20  # bad lines named in one error, as clara.data names bad records


def _lines(path: str) -> Iterator[tuple[str, int, bytes]]:
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if raw.strip():
                yield path, number, raw


def content_id(text: str) -> str:
    return "doc-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _corpus_line(obj) -> list[tuple[str | None, str]]:
    """(id or None for a content id, text) pairs of one parsed line; raises ValueError with the reason."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "text" in obj:
        if "id" not in obj:
            raise ValueError("field 'id': expected a string or integer, got nothing")
        doc_id = obj["id"]
        if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)) or doc_id == "":
            raise ValueError(f"field 'id': expected a non-empty string or an integer, got {doc_id!r}")
        if not isinstance(obj["text"], str) or not obj["text"].strip():
            raise ValueError("field 'text': expected a non-empty string")
        return [(str(doc_id), obj["text"])]
    if "docs" in obj:
        docs = obj["docs"]
        if not isinstance(docs, list) or not docs or not all(isinstance(d, str) and d.strip() for d in docs):
            raise ValueError("field 'docs': expected a non-empty list of non-empty strings")
        return [(None, d) for d in docs]
    raise ValueError('expected {"id": ..., "text": ...} or a record with a \'docs\' list')


def read_corpus(path: str) -> tuple[list[str], list[str]]:
    """Ids and texts of a corpus file; bad lines and duplicate ids raise DataError naming FILE:LINE."""
    if not os.path.isfile(path):
        raise DataError(f"--corpus: {path!r} is neither a corpus file (JSONL) nor a folder of documents")
    ids: list[str] = []
    texts: list[str] = []
    first_line: dict[str, int] = {}
    errors: list[str] = []
    for file, number, raw in _lines(path):
        try:
            pairs = _corpus_line(json.loads(raw.decode("utf-8")))
        except UnicodeDecodeError as error:
            errors.append(f"{file}:{number}: not valid UTF-8 (byte {error.start} of the line)")
            continue
        except json.JSONDecodeError as error:
            errors.append(f"{file}:{number}: not valid JSON ({error.msg}, column {error.colno})")
            continue
        except ValueError as error:
            errors.append(f"{file}:{number}: {error}")
            continue
        for doc_id, text in pairs:
            if doc_id is None:
                doc_id = content_id(text)
                if doc_id in first_line:  # the same document in several records: stored once
                    continue
            elif doc_id in first_line:
                errors.append(
                    f"{file}:{number}: field 'id': duplicate id {doc_id!r} (first on line {first_line[doc_id]})"
                )
                continue
            first_line[doc_id] = number
            ids.append(doc_id)
            texts.append(text)
    if errors:
        more = len(errors) - MAX_REPORTED_ERRORS
        raise DataError(
            f"{len(errors)} bad corpus record(s) in {path}:\n"
            + "\n".join(errors[:MAX_REPORTED_ERRORS])
            + (f"\n... and {more} more bad lines" if more > 0 else "")
        )
    if not ids:
        raise DataError(f"{path}: no documents")
    return ids, texts


def corpus_hash(ids: list[str], texts: list[str]) -> str:
    digest = hashlib.sha256()
    for doc_id, text in zip(ids, texts):
        digest.update(json.dumps([doc_id, text], ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()


def load_corpus(path: str) -> tuple[list[str], list[str], dict]:
    """Ids and texts of a corpus file or folder, and what was read: {"path", "files", "read", "skipped"} (a
    file: one file read; a folder: its files, the skipped ones with their reasons)."""
    if os.path.isdir(path):
        found = read_folder(path)
        return found.ids, found.texts, {"path": path, **found.summary()}
    ids, texts = read_corpus(path)
    return ids, texts, {"path": path, "files": 1, "read": 1, "skipped": {}}
