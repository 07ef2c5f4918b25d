"""Shared test set-up.

Tests marked `gpu` (tests/test_gpu.py) need CUDA: they are skipped on a machine without it and run
wherever it is present (scripts/gpu_check.sh runs them with `pytest -m gpu`). Tests marked `vllm` need vLLM's
environment (scripts/make_vllm_env.sh, or $CLARA_VLLM_PYTHON): they are skipped, naming it, where it is absent.

The tiny model is small enough that thread start-up costs more than it saves, and on a 2-core
machine the subprocesses that tests start compete with the test process: one thread each.
The built-in tiny model ships in clara/tiny_model, so no test waits for a build;
tests/training/test_tiny.py fails when its recipe changed without a rebuild.
"""

import os

import pytest
import torch

from tests.helpers import vllm_python

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
