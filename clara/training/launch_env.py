"""The launchers' own environment variables (`python -m clara.training.launch`): the processes (NUM_GPUS,
NUM_NODES, NODE_RANK, MASTER_ADDR, MASTER_PORT) read and checked, and the list of every variable a launcher
reads (`SCRIPT --help`). A bad value is a LaunchError whose message is the whole line, naming the variable as
the user wrote it."""

from __future__ import annotations

import dataclasses
import os
import re
import textwrap
from dataclasses import dataclass

from clara.config import REPO_ROOT, TrainConfig
from clara.ports import free_port, port_is_free

DEFAULT_MASTER_ADDR = "127.0.0.1"


# The launchers' own settings besides the trainer's flags: (variable, default, meaning); a script may set
# its own default in its defaults block (train_8gpu.sh: NUM_GPUS=8).
PROCESS_SETTINGS = (
    ("NUM_GPUS", "1", "processes per node (CPU processes without CUDA)"),
    ("NUM_NODES", "1", "nodes: run the script on each, with the same MASTER_ADDR, MASTER_PORT and NUM_NODES"),
    ("NODE_RANK", "0", "this node's rank; the node at MASTER_ADDR has 0"),
    ("MASTER_ADDR", DEFAULT_MASTER_ADDR, "address of the node with NODE_RANK=0"),
    ("MASTER_PORT", "unset", "unset: a free port on one node, the script's port with several nodes"),
    ("DRY_RUN", "false", "true: print the command and exit"),
)
# A line of a script's defaults block: `: "${NAME:=value}"  # meaning`.
SCRIPT_DEFAULT = re.compile(r'^: "\$\{(\w+):=([^}]*)\}"[ \t]*(?:#[ \t]*(.*))?$', re.MULTILINE)


class LaunchError(Exception):
    """A bad launcher setting: the message is the whole line."""


@dataclass
class Processes:
    num_gpus: int
    num_nodes: int
    node_rank: int
    master_addr: str
    master_port: int

    @property
    def world_size(self) -> int:
        return self.num_gpus * self.num_nodes


def env_int(name: str, minimum: int, maximum: int | None = None) -> int | None:
    """An integer variable, None when unset; leading zeros are fine, signs and decimals are not."""
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    expected = (
        f"an integer from {minimum} to {maximum}"
        if maximum is not None
        else "a positive integer"
        if minimum == 1
        else f"an integer >= {minimum}"
    )
    if not text.isdigit() or int(text) < minimum or (maximum is not None and int(text) > maximum):
        raise LaunchError(f"{name}={text}: expected {expected}")
    return int(text)


def env_bool(name: str) -> bool:
    text = os.environ.get(name, "").strip()
    if text.lower() not in ("true", "false"):
        raise LaunchError(f"{name}={text}: expected true or false")
    return text.lower() == "true"


def processes_from_env(default_port: int) -> Processes:
    num_nodes = env_int("NUM_NODES", 1) or 1
    node_rank = env_int("NODE_RANK", 0) or 0
    if node_rank >= num_nodes:
        raise LaunchError(
            f"NODE_RANK={node_rank}: expected a node rank below NUM_NODES={num_nodes} (0 to {num_nodes - 1})"
        )
    master_addr = os.environ.get("MASTER_ADDR", "").strip() or DEFAULT_MASTER_ADDR
    port = env_int("MASTER_PORT", 1, 65535)
    if port is None:
        # One node: a free port of our own, so that a rerun right after kill -9 (whose dying workers
        # still hold the old port) starts at once. Several nodes must agree on the script's port.
        port = free_port() if num_nodes == 1 else default_port
    elif node_rank == 0 and not port_is_free(port):
        raise LaunchError(
            f"MASTER_PORT={port}: already in use on this machine (another run?); expected a "
            f"free port, or leave MASTER_PORT unset on one node to pick one"
        )
    return Processes(env_int("NUM_GPUS", 1) or 1, num_nodes, node_rank, master_addr, port)


def usage(script: str) -> str:
    """Every variable the launcher reads, with its default and meaning: the script's own defaults block first,
    then the trainer's settings and the process settings (what `SCRIPT --help` prints)."""
    text = (REPO_ROOT / script).read_text(encoding="utf-8")
    own = {name: (value or "unset", meaning) for name, value, meaning in SCRIPT_DEFAULT.findall(text)}
    rows = [(name, default, meaning) for name, (default, meaning) in own.items()]
    for field in dataclasses.fields(TrainConfig):
        if field.name.upper() not in own:
            default = "unset" if field.default is None else str(field.default)
            rows.append(
                (
                    field.name.upper(),
                    default.lower() if isinstance(field.default, bool) else default,
                    field.metadata["help"],
                )
            )
    rows += [row for row in PROCESS_SETTINGS if row[0] not in own]
    width = max(len(name) for name, _, _ in rows) + 2
    lines = [f"{'Variable':<{width}}{'Default':<10}Meaning (empty means unset)"]
    for name, default, meaning in rows:
        lines += textwrap.wrap(
            meaning, 118, initial_indent=f"{name:<{width}}{default:<10}", subsequent_indent=" " * (width + 10)
        ) or [f"{name:<{width}}{default}"]
    return "\n".join(lines)
