"""What several test files need, written once: the repository's folders, the environment of a child process,
running `python -m MODULE` in one, and reading a JSON-lines file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "example"


def subprocess_env(**overrides) -> dict:
    """This process's environment for a child: one thread, no colours, this checkout first on the path, and
    no torchrun rank left over."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), NO_COLOR="1", **overrides)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def run_module(args: list[str], env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """`python -m ARGS...` from the repository's root, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        env=subprocess_env() if env is None else env,
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )


def vllm_python() -> str:
    """The python of vLLM's environment for the `vllm` tests: $CLARA_VLLM_PYTHON, or the one
    scripts/make_vllm_env.sh makes by default."""
    env = os.environ.get("CLARA_VLLM_ENV") or str(Path.home() / ".cache" / "clara" / "vllm-env")
    return os.environ.get("CLARA_VLLM_PYTHON") or str(Path(env) / "bin" / "python")


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
