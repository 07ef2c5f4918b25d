"""A corpus that grows and shrinks: add, remove and compact change a published index in place.

Each one reads the published index.json, writes only new files (new shards get numbers never used before, the
search structure a file of the new generation), then publishes index.json with the generation one higher: a
reader (a server) sees the old index or the new one, and the old one's files stay until the next change.
A run killed part-way leaves pending.json (what it was doing) and some new shards; the same command run again
reuses them, another command discards them. The caller holds the folder's lock.

    add      compresses only the new documents, into new shards, and adds their rows to the search structure;
             an id already stored is refused, or with replace its old row is removed
    remove   tombstones: the rows of the given ids (a document id: every passage of it) are left out of search
    compact  rewrites the shards and the search structure without the removed rows
"""

from __future__ import annotations

import os

import faiss
import torch

from clara.errors import CorpusIndexError
from clara.files import atomic_path, write_json_atomic
from clara.index.build import compress_shards, shard_vectors, write_search, write_shard
from clara.index.corpus import corpus_hash
from clara.index.passages import count_longer
from clara.index.search import SearchSettings
from clara.index.store import (
    PASSAGE_SEPARATOR,
    PENDING_FILE,
    SEARCH_FILE,
    compressor_fingerprint,
    load_index,
    publish_meta,
    read_json,
    shard_names,
)
from clara.model.model import ClaraModel
from clara.parallel.shards import ShardedJob, changed_settings

MAX_NAMED = 5  # ids named in one error


def _pending(path: str, plan: dict, meta: dict) -> None:
    """Record what this run does. The shards of an unfinished run of another command (or of the same command
    with other inputs) are deleted first: they carry numbers this run is about to use."""
    before = read_json(os.path.join(path, PENDING_FILE))
    if before is not None and not changed_settings(before, plan):
        return
    for name in os.listdir(path):
        number = name.split("-", 1)[-1].split(".", 1)[0]
        if name.startswith(("memory-", "documents-")) and number.isdigit() and int(number) >= meta["next_shard"]:
            os.remove(os.path.join(path, name))
    write_json_atomic(os.path.join(path, PENDING_FILE), plan)


def _named(ids: list[str]) -> str:
    more = len(ids) - MAX_NAMED
    return ", ".join(repr(i) for i in ids[:MAX_NAMED]) + (f" and {more} more" if more > 0 else "")


def _next(meta: dict, **changes) -> dict:
    """The meta of the next generation."""
    new = {**meta, **changes, "generation": meta["generation"] + 1}
    new["rows"] = sum(shard["rows"] for shard in new["shards"])
    new["documents"] = new["rows"] - len(new["removed"])
    return new


def check_same_compressor(meta: dict, model: ClaraModel, checkpoint: str, path: str) -> None:
    """add keeps the build's check: the new rows must come from the compressor that made the stored ones."""
    mine = {"fingerprint": compressor_fingerprint(model), "n_mem": model.tokens.n_mem, "hidden": model.hidden_size}
    if differ := changed_settings(meta, mine, tuple(mine)):
        said = ", ".join(
            f"{key} {str(meta[key])[:12]} (index) vs {str(mine[key])[:12]} (--checkpoint)" for key in differ
        )
        raise CorpusIndexError(
            f"--index {path} was built with the compressor of {meta['checkpoint']!r}, not that of {checkpoint}: "
            f"{said}; add with the checkpoint that built it, or build a new index"
        )


def add_documents(
    model: ClaraModel,
    path: str,
    ids: list[str],
    texts: list[str],
    *,
    replace: bool = False,
    batch_size: int = 32,
    checkpoint: str = "",
    device: torch.device | None = None,
    show_progress: bool = True,
    log=print,
) -> dict:
    """Compress the new documents into new shards and publish the next generation; returns its meta."""
    index = load_index(path)
    meta = index.meta
    check_same_compressor(meta, model, checkpoint, path)
    live = {doc_id: row for row, doc_id in enumerate(index.ids) if row not in index.removed}
    stored = [doc_id for doc_id in ids if doc_id in live]
    if stored and not replace:
        raise CorpusIndexError(
            f"--corpus: {len(stored)} id(s) already in --index {path}: {_named(stored)}; "
            "pass --replace to store the new texts in their place"
        )
    plan = {
        "command": "add",
        "generation": meta["generation"],
        "corpus_sha256": corpus_hash(ids, texts),
        "replace": replace,
        "first_shard": meta["next_shard"],
    }
    _pending(path, plan, meta)
    first = plan["first_shard"]
    job = ShardedJob(len(ids), meta["shard_size"], lambda i: os.path.join(path, shard_names(first + i)[0]))
    done = job.count - len(job.pending())
    if done:
        log(f"Resuming the add into {path}: {done} of {job.count} new shard(s) already built")
    device = device if device is not None else model.mem_embeddings.device
    compress_shards(
        model, job, job.pending(), ids, texts, path, first, batch_size, meta["storage_dtype"], device, show_progress
    )
    new_shards = [{"number": first + i, "rows": stop - start} for i, (start, stop) in enumerate(job.ranges())]
    search = index.search_index
    for vectors in shard_vectors(path, new_shards):
        search.add(vectors)
    new = _next(
        meta,
        shards=meta["shards"] + new_shards,
        next_shard=first + job.count,
        removed=sorted(index.removed | {live[doc_id] for doc_id in stored}),
        search_file=SEARCH_FILE.format(meta["generation"] + 1),
        longer_than_read=meta.get("longer_than_read", 0)
        + count_longer(model.tokenizer, texts, model.settings.doc_max_length),
    )
    _write_search_file(path, search, new["search_file"])
    index.close()
    publish_meta(path, new, meta)
    return new


def _write_search_file(path: str, search: faiss.Index, name: str) -> None:
    with atomic_path(os.path.join(path, name)) as tmp:
        faiss.write_index(search, tmp)


def matching_rows(stored_ids: list[str], wanted: list[str]) -> tuple[set[int], list[str]]:
    """The rows of the wanted ids (a document id matches its passages `ID#N` too), and the ids matching none."""
    wanted_set = set(wanted)
    rows, found = set(), set()
    for row, doc_id in enumerate(stored_ids):
        document = doc_id.split(PASSAGE_SEPARATOR, 1)[0]
        for key in (doc_id, document):
            if key in wanted_set:
                rows.add(row)
                found.add(key)
    return rows, [doc_id for doc_id in wanted if doc_id not in found]


def read_id_file(ids_file: str) -> list[str]:
    """One id per line (blank lines skipped)."""
    if not os.path.isfile(ids_file):
        raise CorpusIndexError(f"--ids: file {ids_file!r} does not exist or is not readable")
    with open(ids_file, encoding="utf-8") as handle:
        ids = [line.strip() for line in handle if line.strip()]
    if not ids:
        raise CorpusIndexError(f"--ids {ids_file}: no ids (expected one document or passage id per line)")
    return ids


def remove_documents(path: str, ids: list[str], log=print) -> dict:
    """Tombstone the rows of these ids and publish the next generation. Ids removed before count as found, so
    the same command run twice is harmless; an id never stored is refused (a typo would remove nothing)."""
    index = load_index(path)
    meta = index.meta
    rows, unknown = matching_rows(index.ids, ids)
    if unknown:
        raise CorpusIndexError(f"--ids: {len(unknown)} id(s) not in --index {path}: {_named(unknown)}")
    removed = index.removed | rows
    if removed == index.removed:
        log(f"Nothing to remove: the {len(rows)} row(s) of these ids are removed already")
        index.close()
        return meta
    if len(removed) == len(index.ids):
        raise CorpusIndexError(f"--ids: would remove every document of --index {path}; build a new index instead")
    new = _next(meta, removed=sorted(removed))
    index.close()
    publish_meta(path, new, meta)
    return new


def compact_index(path: str, log=print) -> dict:
    """Rewrite the shards without the removed rows (shards of the build's size, new numbers) and build the
    search structure anew over them; publish the next generation."""
    index = load_index(path)
    meta = index.meta
    if not index.removed:
        log(f"Nothing to compact: {path} has no removed documents")
        index.close()
        return meta
    live = [row for row in range(len(index.ids)) if row not in index.removed]
    plan = {"command": "compact", "generation": meta["generation"], "first_shard": meta["next_shard"]}
    _pending(path, plan, meta)
    first = plan["first_shard"]
    job = ShardedJob(len(live), meta["shard_size"], lambda i: os.path.join(path, shard_names(first + i)[0]))
    for i in job.pending():
        start, stop = job.ranges()[i]
        rows = live[start:stop]
        write_shard(
            path,
            first + i,
            index.stored_memory(rows),
            [index.ids[r] for r in rows],
            [index.text(r) for r in rows],
        )
    shards = [{"number": first + i, "rows": stop - start} for i, (start, stop) in enumerate(job.ranges())]
    settings = SearchSettings(**{key: meta["search"][key] for key in SearchSettings.__dataclass_fields__})
    index.close()
    fields = write_search(path, shards, settings, meta["generation"] + 1, log)
    new = _next(meta, shards=shards, next_shard=first + job.count, removed=[], **fields)
    publish_meta(path, new, meta)
    log(f"Compacted {path}: {len(index.ids)} rows -> {len(live)} in {job.count} shard(s)")
    return new
