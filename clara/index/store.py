"""An index folder: its files, the compressor fingerprint that ties it to a checkpoint, and reading it back."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import faiss
import numpy as np
import torch
from safetensors import safe_open

from clara.errors import CorpusIndexError
from clara.model.checkpoint import added_token_rows
from clara.model.model import ClaraModel
from clara.stages import COMPRESSOR

INDEX_FORMAT = "clara-index"
INDEX_FORMAT_VERSION = 1
BUILD_FILE = "build.json"
META_FILE = "index.json"
DOCS_FILE = "documents.jsonl"
FAISS_FILE = "faiss.index"
SHARD_FILE = "memory-{:05d}.safetensors"
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def read_shard(out_dir: str, i: int) -> torch.Tensor:
    with safe_open(os.path.join(out_dir, SHARD_FILE.format(i)), framework="pt") as shard:
        return shard.get_tensor("memory")


@dataclass
class CorpusIndex:
    path: str
    meta: dict
    ids: list[str]
    texts: list[str]
    search_index: faiss.Index

    def memory(self, rows: list[int]) -> torch.Tensor:
        """Stored memory states [len(rows), n, H] (float32) of these rows."""
        size = self.meta["shard_size"]
        out = []
        for row in rows:
            with safe_open(os.path.join(self.path, SHARD_FILE.format(row // size)), framework="pt") as shard:
                out.append(shard.get_slice("memory")[row % size : row % size + 1].float())
        return torch.cat(out)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and rows [Q, k] of the k nearest documents of normalised float32 queries [Q, d]."""
        return self.search_index.search(queries, min(k, len(self.ids)))


def load_index(path: str) -> CorpusIndex:
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
    ids, texts = [], []
    with open(os.path.join(path, DOCS_FILE), encoding="utf-8") as handle:
        for line in handle:
            doc = json.loads(line)
            ids.append(doc["id"])
            texts.append(doc["text"])
    search_index = faiss.read_index(os.path.join(path, FAISS_FILE))
    if meta["search"]["kind"] == "ivf":
        search_index.nprobe = meta["search"]["nprobe"]
    elif meta["search"]["kind"] == "hnsw":
        search_index.hnsw.efSearch = meta["search"]["ef_search"]
    return CorpusIndex(path, meta, ids, texts, search_index)


def check_index_matches(index: CorpusIndex, model: ClaraModel, checkpoint: str = "this model") -> None:
    """Refuse an index whose vectors another compressor made: they would be read as noise."""
    mine = compressor_fingerprint(model)
    if index.meta["fingerprint"] != mine:
        raise CorpusIndexError(
            f"--index {index.path} was built with the compressor of {index.meta['checkpoint']!r} "
            f"(fingerprint {index.meta['fingerprint'][:12]}), not that of {checkpoint} ({mine[:12]}); "
            f"rebuild it: python -m clara.index --checkpoint {checkpoint} --corpus ... --out NEW_DIR"
        )
