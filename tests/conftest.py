"""Shared test set-up.

Tests marked `gpu` (tests/test_gpu.py) need CUDA: they are skipped on a machine without it and run
wherever it is present (scripts/gpu_check.sh runs them with `pytest -m gpu`). Tests marked `vllm` need vLLM's
environment (scripts/make_vllm_env.sh, or $CLARA_VLLM_PYTHON): they are skipped, naming it, where it is absent.

The tiny model is small enough that thread start-up costs more than it saves, and on a 2-core
machine the subprocesses that tests start compete with the test process: one thread each.
The built-in tiny model ships in clara/tiny_model, so no test waits for a build;
tests/training/test_tiny.py fails when its recipe changed without a rebuild.

One trained tiny stage-2 checkpoint (and its stage1_2 parent) and one corpus index of it are made once per
session, when a test first asks for them, and shared: the end-to-end tests that need "a stage-2 model and an
index" (the Python API, serving, clara.ask) reuse them instead of making their own.

The suite runs on pytest-xdist's workers (pytest.ini: one per core, at most 4, a test file on one worker).
The shared checkpoint and index are made by the first worker that asks, under a file lock, and read by the
others; the files that run longest are handed out first, so that no worker is left with one of them at the end.
"""

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from tests.helpers import SHARED_TOP_K, index_example_documents, run_module, vllm_python

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# The test files that take minutes (a learning run, several trainings): first in the order, since xdist hands
# out whole files in collection order (pytest.ini: --no-loadscope-reorder) and a long file handed out last
# would run alone at the end.
LONGEST_FIRST = (
    "end_to_end/test_learning.py",
    "end_to_end/test_zero3.py",
    "end_to_end/test_launchers.py",
    "data/test_hub_data.py",
    "end_to_end/test_tutorial.py",
)


def _longest_first(item: pytest.Item) -> int:
    path = item.path.as_posix()
    return next((rank for rank, name in enumerate(LONGEST_FIRST) if path.endswith(name)), len(LONGEST_FIRST))


def pytest_collection_modifyitems(config, items):
    """GPU-marked tests skip where CUDA is absent, and only there: `pytest -m gpu` on a GPU machine runs them.
    vLLM-marked tests skip where vLLM's environment is absent (scripts/make_vllm_env.sh makes it).
    The longest files come first (a stable sort: every worker collects the same order)."""
    items.sort(key=_longest_first)
    skips = {}
    if not torch.cuda.is_available():
        skips["gpu"] = pytest.mark.skip(reason="needs a CUDA device (run scripts/gpu_check.sh on a GPU machine)")
    python = vllm_python()
    if not os.access(python, os.X_OK):
        skips["vllm"] = pytest.mark.skip(
            reason=f"needs vLLM's environment ({python} is missing): make it with scripts/make_vllm_env.sh"
        )
    for item in items:
        for marker, skip in skips.items():
            if item.get_closest_marker(marker) is not None:
                item.add_marker(skip)


# The shared stage-2 model: stage1_2 from fresh adapters, then stage2 from it, two optimizer steps each.
TRAIN_STEPS = 2
TRAIN_SAMPLES = 8


def made_once(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], None]) -> Path:
    """The folder `name`, filled by `make(folder)` once per test run however many xdist workers ask for it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # each worker's base folder sits in the run's
    folder = root / name
    done = folder / ".made"
    with FileLock(f"{folder}.lock"):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a worker that failed half-way left it
            folder.mkdir()
            make(folder)
            done.touch()
    return folder


def _train_shared_stages(workdir: Path) -> None:
    previous = None
    for stage in ("stage1_2", "stage2"):
        args = ["clara.train", "--stage", stage, "--save_path", str(workdir / stage), "--max_steps", str(TRAIN_STEPS)]
        args += ["--batch_size", "2", "--micro_batch_size", "2", "--max_samples", str(TRAIN_SAMPLES)]
        args += ["--generation_top_k", str(SHARED_TOP_K), "--debug_mode", "false"]
        args += ["--pretrain_checkpoint", str(workdir / previous)] if previous else ["--allow_no_checkpoint", "true"]
        proc = run_module(args, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        previous = stage


@pytest.fixture(scope="session")
def trained_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """stage1_2 (fresh adapters) -> stage2, trained with `python -m clara.train`: {"stage1_2": DIR, "stage2": DIR}."""
    workdir = made_once(tmp_path_factory, "trained", _train_shared_stages)
    return {stage: workdir / stage for stage in ("stage1_2", "stage2")}


@pytest.fixture(scope="session")
def trained_index(trained_checkpoints, tmp_path_factory) -> Path:
    """The index of the first SHARED_INDEX_DOCUMENTS example documents, compressed by the shared stage-2 checkpoint."""
    from clara.evaluation.inference import CLaRa

    checkpoint = trained_checkpoints["stage2"]

    def make(folder: Path) -> None:
        index_example_documents(CLaRa.from_pretrained(str(checkpoint)).model, checkpoint, folder / "index")

    return made_once(tmp_path_factory, "trained_index", make) / "index"
