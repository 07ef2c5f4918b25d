"""A synthesis run over a corpus: planned in shards of documents, each written whole when all of its documents
are done, so that a stopped run continues where it was with the same command.

    OUT/manifest.json          the run's settings and shard plan (a rerun with other settings is refused), and,
                               once every shard is done, the files written from them
    OUT/shards/shard-NNNNN.jsonl   what the recipe made of each document of a shard (clara.synthesis.documents)

Under torchrun (a local model on several GPUs) process r works on shards r, r + world, ...; rank 0 waits for
all of them and writes the training files (clara.synthesis.records).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable

from tqdm import tqdm

from clara.errors import ConfigError
from clara.files import write_json_atomic, write_text_atomic
from clara.parallel.shards import ShardedJob, changed_settings, read_plan
from clara.synthesis.documents import Asking, synthesize_document

MANIFEST = "manifest.json"
SHARD_DIR = "shards"
SHARDS_IN_PROGRESS = 2  # the next shard starts while the last documents of the previous one finish


def shard_path(out: str, shard: int) -> str:
    return os.path.join(out, SHARD_DIR, f"shard-{shard:05d}.jsonl")


def sharded_job(out: str, documents: int, shard_size: int) -> ShardedJob:
    """The run's shards (clara.parallel.shards): a shard is done when its file exists."""
    return ShardedJob(documents, shard_size, lambda i: shard_path(out, i))


def read_manifest(out: str) -> dict | None:
    return read_plan(os.path.join(out, MANIFEST))


def start_or_resume(out: str, settings: dict, shards: list[tuple[int, int]], rank: int) -> None:
    """Write the manifest of a new run; for an earlier run in `out`, check that its settings are these."""
    manifest = read_manifest(out)
    if manifest is not None:
        before = manifest["settings"]
        if changed := changed_settings(before, settings):
            said = ", ".join(f"{k}: {before.get(k)!r} -> {settings.get(k)!r}" for k in changed)
            raise ConfigError("out", out, f"a new folder, or the settings of the run it holds ({said})")
    os.makedirs(os.path.join(out, SHARD_DIR), exist_ok=True)
    if manifest is None and rank == 0:
        write_json_atomic(
            os.path.join(out, MANIFEST),
            {
                "settings": settings,
                "shards": [
                    {"file": os.path.relpath(shard_path(out, i), out), "documents": [start, stop]}
                    for i, (start, stop) in enumerate(shards)
                ],
                "outputs": None,
            },
        )


async def _all_or_nothing(awaitables: list[Awaitable]) -> list:
    """Run them together; the first error cancels the rest and is raised."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


async def synthesize_shards(
    asking: Asking,
    ids: list[str],
    texts: list[str],
    out: str,
    shards: list[tuple[int, int]],
    todo: list[int],
    show_progress: bool,
) -> None:
    """Synthesize the shards `todo`, writing each one whole when its last document is done."""
    progress = tqdm(
        total=sum(shards[i][1] - shards[i][0] for i in todo), unit="doc", disable=not show_progress, dynamic_ncols=True
    )
    tokens = 0
    slots = asyncio.Semaphore(SHARDS_IN_PROGRESS)

    async def one_document(j: int) -> dict:
        nonlocal tokens
        result = await synthesize_document(asking, ids[j], texts[j])
        tokens += result["prompt_tokens"] + result["completion_tokens"]
        progress.update(1)
        progress.set_postfix(in_flight=asking.llm.in_flight, tokens=tokens, refresh=False)
        return result

    async def one_shard(i: int) -> None:
        async with slots:
            start, stop = shards[i]
            results = await _all_or_nothing([one_document(j) for j in range(start, stop)])
            write_text_atomic(shard_path(out, i), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results))

    try:
        await _all_or_nothing([one_shard(i) for i in todo])
    finally:
        progress.close()
        await asking.llm.close()


def read_shards(out: str, count: int) -> list[dict]:
    """Every document's result, in corpus order."""
    results = []
    for i in range(count):
        with open(shard_path(out, i), encoding="utf-8") as handle:
            results.extend(json.loads(line) for line in handle)
    return results
