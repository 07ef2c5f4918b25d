"""A resumable job over many items: the items are cut into shards of a fixed size, each shard's result is one
file written whole (atomically), and a file that exists is a shard that is done. A stopped job is run again
with the same command and does only the missing shards.

The plan does not depend on the number of processes: under torchrun process r takes shards r, r + world, ...;
rank 0 then waits for the others' files (they may be on other nodes of a shared file system) and merges.
A job keeps its settings in a plan file beside the shards; a rerun with other settings is refused, since its
shards would be mixed with the earlier ones. The index build and synthesis both run this way.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

WAIT_POLL_SECONDS = 2.0


@dataclass(frozen=True)
class ShardedJob:
    """`items` items in shards of `shard_size`; `path(i)` is the file whose existence marks shard i done."""

    items: int
    shard_size: int
    path: Callable[[int], str]

    @property
    def count(self) -> int:
        return -(-self.items // self.shard_size)

    def ranges(self) -> list[tuple[int, int]]:
        """(start, stop) item range of every shard."""
        return [(start, min(start + self.shard_size, self.items)) for start in range(0, self.items, self.shard_size)]

    def pending(self, rank: int = 0, world: int = 1) -> list[int]:
        """The shards of process `rank` (of `world`) whose file does not exist yet."""
        return [i for i in range(rank, self.count, world) if not os.path.exists(self.path(i))]

    def items_in(self, shards: list[int]) -> int:
        ranges = self.ranges()
        return sum(ranges[i][1] - ranges[i][0] for i in shards)

    def wait(self, log: Callable[[str], None], poll_seconds: float = WAIT_POLL_SECONDS) -> None:
        """Rank 0: wait until every shard's file exists (the other processes write theirs)."""
        told = False
        while missing := self.pending():
            if not told:
                log(f"Waiting for {len(missing)} shard(s) of the other processes")
                told = True
            time.sleep(poll_seconds)


def read_plan(path: str) -> dict | None:
    """The plan file's object, None when there is none (a new job)."""
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def changed_settings(before: dict, now: dict, keys: tuple[str, ...] | None = None) -> list[str]:
    """The keys (all of both, or `keys`) whose values differ between an earlier job's settings and these."""
    names = keys if keys is not None else tuple(set(before) | set(now))
    return sorted(key for key in names if before.get(key) != now.get(key))
