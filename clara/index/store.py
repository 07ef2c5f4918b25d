"""An index folder: its files, the compressor fingerprint that ties it to a checkpoint, and reading it back."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import faiss
import numpy as np
import torch

from clara.errors import CorpusIndexError
from clara.files import write_json_atomic
from clara.index.search import COMPRESSED_KINDS, normalised_rows
from clara.model.checkpoint import added_token_rows
from clara.model.model import ClaraModel
from clara.stages import COMPRESSOR

INDEX_FORMAT = "clara-index"
# 2: shards listed in index.json with their own texts file, a search file per generation, removed rows.
INDEX_FORMAT_VERSION = 2
BUILD_FILE = "build.json"
META_FILE = "index.json"
PENDING_FILE = "pending.json"
SHARD_FILE = "memory-{:05d}.safetensors"
TEXTS_FILE = "documents-{:05d}.jsonl"
SEARCH_FILE = "search-{:05d}.faiss"
# How the generator's memory vectors are stored: the tensor dtype of a shard's "memory". int8 and fp8 (e4m3) keep a
# float32 scale per memory vector beside it ("scale" [D, n]) and are dequantized on read.
STORAGE_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int8": torch.int8,
    "fp8": torch.float8_e4m3fn,
}
QUANTIZED_RANGE = {"int8": 127.0, "fp8": 448.0}  # the largest magnitude each stores; a vector's scale maps it there
# A passage's id is its document's id, this separator and its number: removing the document removes them all.
PASSAGE_SEPARATOR = "#"
# Candidates fetched beyond k, so that documents tied with the k-th are all seen before ties are ordered by id.
TIE_MARGIN = 8
# Scores this close are the same document distance computed with other padding (float noise is about 1e-6).
TIE_TOLERANCE = 1e-5


def to_storage(memory: torch.Tensor, storage_dtype: str) -> dict[str, torch.Tensor]:
    """A shard's tensors for memory states [D, n, H] (float32) in the storage dtype."""
    if storage_dtype not in QUANTIZED_RANGE:
        return {"memory": memory.to(STORAGE_DTYPES[storage_dtype]).contiguous()}
    scale = memory.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / QUANTIZED_RANGE[storage_dtype]
    scaled = memory / scale
    if storage_dtype == "int8":
        scaled = scaled.round().clamp(-127, 127)
    return {"memory": scaled.to(STORAGE_DTYPES[storage_dtype]).contiguous(), "scale": scale.squeeze(-1).contiguous()}


def from_storage(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Memory states [D, n, H] as float32, dequantized where the shard holds a scale."""
    memory = tensors["memory"].float()
    return memory * tensors["scale"].unsqueeze(-1) if "scale" in tensors else memory


def bytes_per_document(n_mem: int, hidden: int, storage_dtype: str) -> int:
    """Bytes of one document's memory vectors on disk (and in RAM once read): the values and any scales."""
    scales = n_mem * 4 if storage_dtype in QUANTIZED_RANGE else 0
    return n_mem * hidden * STORAGE_DTYPES[storage_dtype].itemsize + scales


def shard_names(number: int) -> tuple[str, str]:
    """The memory file and the texts file of shard `number`."""
    return SHARD_FILE.format(number), TEXTS_FILE.format(number)


def referenced_files(meta: dict) -> set[str]:
    """Every file a published index.json reads: its shards and its search file."""
    return {name for shard in meta["shards"] for name in shard_names(shard["number"])} | {meta["search_file"]}


def texts_lines(ids: list[str], texts: list[str]) -> str:
    """A shard's texts file: one JSON line per row, read back by byte offset."""
    return "".join(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n" for i, t in zip(ids, texts))


def publish_meta(path: str, meta: dict, previous: dict | None) -> None:
    """Publish a new index.json (one atomic rename: readers see the old index or the new one), then delete what
    neither it nor the index it replaces reads: a server still answering from the previous generation keeps its
    files, and leftovers of a killed run (half-written files, shards of an abandoned add) go."""
    write_json_atomic(os.path.join(path, META_FILE), meta)
    keep = referenced_files(meta) | (referenced_files(previous) if previous else set())
    for name in os.listdir(path):
        ours = name.startswith(("memory-", "documents-", "search-")) or name == PENDING_FILE
        if (ours and name not in keep) or (".tmp" in name and not name.startswith(".")):
            os.remove(os.path.join(path, name))


def compressor_fingerprint(model: ClaraModel) -> str:
    """SHA-256 of what decides the memory vectors: the compressor's LoRA weights, the memory embeddings,
    the added tokens' rows, a sample of the base model's embeddings and the document length.

    Weights are hashed as bfloat16, so a model loaded in float32 on CPU and in bfloat16 on a GPU
    agree. Checkpoints that differ only in the query reasoner or the generator share a fingerprint
    (and an index): stage 2 keeps the compressor and its memory embeddings frozen, so a stage1_2
    checkpoint and the stage2 checkpoints trained from it share one index.
    """
    digest = hashlib.sha256(json.dumps([model.settings.n_mem_tokens, model.settings.doc_max_length]).encode())

    def add(name: str, tensor: torch.Tensor) -> None:
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())

    for name, param in sorted(model.peft_model.named_parameters()):
        if f".{COMPRESSOR}." in name:
            add(name, param)
    add("mem_embeddings", model.mem_embeddings)
    for name, rows in sorted(added_token_rows(model).items()):
        add(name, rows)
    add("base_embedding_sample", model.causal_lm.get_input_embeddings().weight[:256])
    return digest.hexdigest()


def read_json(path: str) -> dict | None:
    """The JSON file's object, None when the file does not exist."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def read_meta(path: str) -> dict:
    """The published index.json of the index folder `path`; a folder that holds none is a user error."""
    meta = read_json(os.path.join(path, META_FILE))
    if meta is None:
        what = (
            "an unfinished build (run python -m clara.index again to finish it)"
            if os.path.isfile(os.path.join(path, BUILD_FILE))
            else "not a corpus index"
        )
        raise CorpusIndexError(f"--index {path}: {what}; no {META_FILE}")
    if meta.get("format") != INDEX_FORMAT or meta.get("format_version", 0) > INDEX_FORMAT_VERSION:
        raise CorpusIndexError(f"{path}/{META_FILE}: not a corpus index this toolkit reads")
    if meta.get("format_version", 0) < INDEX_FORMAT_VERSION:
        raise CorpusIndexError(
            f"{path}/{META_FILE}: an index of format {meta.get('format_version')} (before add/remove/compact); "
            "build it again with python -m clara.index"
        )
    return meta


def shard_row_starts(meta: dict) -> np.ndarray:
    """The first row of every shard, and the total row count last."""
    return np.concatenate([[0], np.cumsum([shard["rows"] for shard in meta["shards"]])]).astype(np.int64)


@dataclass
class CorpusIndex:
    """A published index, read as it was when loaded: a later add, remove or compact publishes a new index.json
    and never changes or deletes the files this one holds open (a server swaps to the new one between batches).

    Rows count every stored document, removed ones too, until compact rewrites the shards; `ids` is per row,
    texts are read from disk on demand, memory rows from the memory-mapped shards.
    """

    path: str
    meta: dict
    ids: list[str]
    search_index: faiss.Index
    removed: frozenset[int]
    starts: np.ndarray  # first row of each shard
    text_offsets: np.ndarray  # [rows + 1 per shard] byte offsets of each row's line in its shard's texts file
    shards: list[dict[str, "MappedTensor"]]  # each shard's tensors, memory-mapped
    text_files: list  # open texts files, one per shard

    @property
    def documents(self) -> int:
        """Documents that search can return (stored rows less the removed ones)."""
        return len(self.ids) - len(self.removed)

    @property
    def generation(self) -> int:
        return self.meta["generation"]

    def _locate(self, row: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self.starts, row, side="right")) - 1
        return shard, row - int(self.starts[shard])

    def text(self, row: int) -> str:
        """The text of a row, read from its shard's texts file (os.pread: safe from several threads)."""
        shard, _ = self._locate(row)
        start, stop = int(self.text_offsets[row + shard]), int(self.text_offsets[row + shard + 1])
        line = os.pread(self.text_files[shard].fileno(), stop - start, start)
        return json.loads(line)["text"]

    def stored_memory(self, rows: list[int]) -> dict[str, torch.Tensor]:
        """The shard tensors of these rows as stored (memory in the storage dtype, and its scales if any)."""
        rows = np.asarray(rows, dtype=np.int64)
        shard_of = np.searchsorted(self.starts, rows, side="right") - 1
        order = np.argsort(shard_of, kind="stable")  # one read per shard, then back in the asked order
        parts: dict[str, list[torch.Tensor]] = {}
        for shard in np.unique(shard_of):
            offsets = rows[order][shard_of[order] == shard] - self.starts[shard]
            for name, mapped in self.shards[shard].items():
                parts.setdefault(name, []).append(mapped.rows(offsets))
        back = torch.from_numpy(np.argsort(order, kind="stable"))
        return {name: torch.cat(chunks)[back] for name, chunks in parts.items()}

    def memory(self, rows: list[int]) -> torch.Tensor:
        """Stored memory states [len(rows), n, H] (float32, dequantized) of these rows."""
        return from_storage(self.stored_memory(rows))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and rows [Q, k] of the k nearest documents of normalised float32 queries [Q, d], removed rows left
        out. Scores within TIE_TOLERANCE of each other are ties, ordered by id: an index changed by add, remove
        and compact and a fresh build of the same corpus then agree, though batches pad differently."""
        k = min(k, self.documents)
        rerank = self.meta["search"]["rerank"] if self.meta["search"]["kind"] in COMPRESSED_KINDS else 0
        fetch = min(max(k, rerank) + len(self.removed) + TIE_MARGIN, self.search_index.ntotal)
        scores, rows = self.search_index.search(queries, fetch)
        if rerank:
            scores = self._exact_scores(queries, rows)
        out_scores, out_rows = np.zeros((len(queries), k), np.float32), np.zeros((len(queries), k), np.int64)
        for q, (row_scores, row_ids) in enumerate(zip(scores.tolist(), rows.tolist())):
            kept = sorted(
                ((s, r) for s, r in zip(row_scores, row_ids) if r >= 0 and r not in self.removed), key=lambda p: -p[0]
            )
            ordered = [pair for tie in _ties(kept) for pair in sorted(tie, key=lambda p: self.ids[p[1]])]
            out_scores[q], out_rows[q] = [s for s, _ in ordered[:k]], [r for _, r in ordered[:k]]
        return out_scores, out_rows

    def _exact_scores(self, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Inner products of the queries with their candidate rows' stored vectors (read from the memory-mapped
        shards, dequantized, normalised): a compressed code's approximate scores replaced by exact ones."""
        wanted = sorted({int(r) for r in rows.flatten() if r >= 0})
        vectors = normalised_rows(self.memory(wanted))
        where = {row: i for i, row in enumerate(wanted)}
        exact = np.full(rows.shape, -np.inf, dtype=np.float32)
        for q, found in enumerate(rows.tolist()):
            kept = [j for j, r in enumerate(found) if r >= 0]
            exact[q, kept] = vectors[[where[found[j]] for j in kept]] @ queries[q]
        return exact

    def close(self) -> None:
        for handle in self.text_files:
            handle.close()
        self.shards.clear()


# safetensors dtype -> (the numpy dtype its bytes are mapped as, the torch dtype they are viewed as)
SAFETENSORS_DTYPES = {
    "F32": (np.float32, torch.float32),
    "F16": (np.float16, torch.float16),
    "BF16": (np.uint16, torch.bfloat16),
    "I8": (np.int8, torch.int8),
    "F8_E4M3": (np.uint8, torch.float8_e4m3fn),
}


@dataclass
class MappedTensor:
    """One tensor of a safetensors file, memory-mapped: reading rows touches only their pages."""

    array: np.ndarray
    dtype: torch.dtype

    def rows(self, offsets: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.array[offsets])).view(self.dtype)


def map_safetensors(path: str) -> dict[str, MappedTensor]:
    """The tensors of a safetensors file, memory-mapped (its header is JSON: reading it runs nothing)."""
    with open(path, "rb") as handle:
        header_size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_size))
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise CorpusIndexError(f"{path}: tensor {name!r} of dtype {info['dtype']}, not one an index stores")
        raw, dtype = SAFETENSORS_DTYPES[info["dtype"]]
        start, stop = info["data_offsets"]
        shape = tuple(info["shape"])
        array = (
            np.memmap(path, dtype=raw, mode="r", offset=8 + header_size + start, shape=shape)
            if stop > start
            else np.zeros(shape, dtype=raw)
        )
        tensors[name] = MappedTensor(array, dtype)
    return tensors


def _ties(ranked: list[tuple[float, int]]) -> list[list[tuple[float, int]]]:
    """(score, row) pairs, best first, cut into runs whose neighbouring scores are within TIE_TOLERANCE."""
    runs: list[list[tuple[float, int]]] = []
    for pair in ranked:
        if runs and runs[-1][-1][0] - pair[0] <= TIE_TOLERANCE:
            runs[-1].append(pair)
        else:
            runs.append([pair])
    return runs


def _read_ids(handle) -> tuple[list[str], list[int]]:
    """The ids of a texts file and the byte offset of every line (and of its end)."""
    ids, offsets = [], [0]
    for line in handle:
        ids.append(json.loads(line)["id"])
        offsets.append(offsets[-1] + len(line))
    return ids, offsets


def load_index(path: str) -> CorpusIndex:
    meta = read_meta(path)
    ids: list[str] = []
    offsets: list[int] = []
    shards, text_files = [], []
    for shard in meta["shards"]:
        memory_name, texts_name = shard_names(shard["number"])
        shards.append(map_safetensors(os.path.join(path, memory_name)))
        handle = open(os.path.join(path, texts_name), "rb")  # noqa: SIM115 - held open for the index's life
        text_files.append(handle)
        shard_ids, shard_offsets = _read_ids(handle)
        if len(shard_ids) != shard["rows"]:
            raise CorpusIndexError(f"{path}/{texts_name}: {len(shard_ids)} documents, index.json says {shard['rows']}")
        ids += shard_ids
        offsets += shard_offsets
    search_index = faiss.read_index(os.path.join(path, meta["search_file"]))
    if meta["search"]["kind"] == "ivf":
        search_index.nprobe = meta["search"]["nprobe"]
    elif meta["search"]["kind"] == "hnsw":
        search_index.hnsw.efSearch = meta["search"]["ef_search"]
    return CorpusIndex(
        path,
        meta,
        ids,
        search_index,
        frozenset(meta["removed"]),
        shard_row_starts(meta)[:-1],
        np.asarray(offsets, dtype=np.int64),
        shards,
        text_files,
    )


def check_index_matches(index: CorpusIndex, model: ClaraModel, checkpoint: str = "this model") -> None:
    """Refuse an index whose vectors another compressor made: they would be read as noise."""
    mine = compressor_fingerprint(model)
    if index.meta["fingerprint"] != mine:
        raise CorpusIndexError(
            f"--index {index.path} was built with the compressor of {index.meta['checkpoint']!r} "
            f"(fingerprint {index.meta['fingerprint'][:12]}), not that of {checkpoint} ({mine[:12]}); "
            f"rebuild it: python -m clara.index --checkpoint {checkpoint} --corpus ... --out NEW_DIR"
        )
