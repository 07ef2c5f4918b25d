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
"""

import os
from pathlib import Path

import pytest
import torch

from tests.helpers import EXAMPLE, SHARED_INDEX_DOCUMENTS, SHARED_TOP_K, read_jsonl, run_module, vllm_python

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config, items):
    """GPU-marked tests skip where CUDA is absent, and only there: `pytest -m gpu` on a GPU machine runs them.
    vLLM-marked tests skip where vLLM's environment is absent (scripts/make_vllm_env.sh makes it)."""
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


@pytest.fixture(scope="session")
def trained_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """stage1_2 (fresh adapters) -> stage2, trained with `python -m clara.train`: {"stage1_2": DIR, "stage2": DIR}."""
    workdir = tmp_path_factory.mktemp("trained")
    paths: dict[str, Path] = {}
    for stage, previous in (("stage1_2", None), ("stage2", "stage1_2")):
        save = workdir / f"ckpt_{stage}"
        args = ["clara.train", "--stage", stage, "--save_path", str(save), "--max_steps", str(TRAIN_STEPS)]
        args += ["--batch_size", "2", "--micro_batch_size", "2", "--max_samples", str(TRAIN_SAMPLES)]
        args += ["--generation_top_k", str(SHARED_TOP_K), "--debug_mode", "false"]
        args += ["--pretrain_checkpoint", str(paths[previous])] if previous else ["--allow_no_checkpoint", "true"]
        proc = run_module(args, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        paths[stage] = save
    return paths


@pytest.fixture(scope="session")
def trained_index(trained_checkpoints, tmp_path_factory) -> Path:
    """The index of the first SHARED_INDEX_DOCUMENTS example documents, compressed by the shared stage-2 checkpoint."""
    from clara.evaluation.inference import CLaRa
    from clara.index.build import build_index

    checkpoint = trained_checkpoints["stage2"]
    model = CLaRa.from_pretrained(str(checkpoint)).model
    docs = read_jsonl(EXAMPLE / "corpus.jsonl")[:SHARED_INDEX_DOCUMENTS]
    out = tmp_path_factory.mktemp("trained_index") / "index"
    build_index(
        model,
        [d["id"] for d in docs],
        [d["text"] for d in docs],
        str(out),
        batch_size=8,
        checkpoint=str(checkpoint),
        show_progress=False,
        log=lambda *args: None,
    )
    return out
