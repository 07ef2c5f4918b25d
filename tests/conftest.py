"""Shared test set-up.

Tests marked `gpu` (tests/test_gpu.py) need CUDA: they are skipped on a machine without it and run
wherever it is present (scripts/gpu_check.sh runs them with `pytest -m gpu`).

The tiny model is small enough that thread start-up costs more than it saves, and on a 2-core
machine the subprocesses that tests start compete with the test process: one thread each.
The built-in tiny model ships in clara/tiny_model, so no test waits for a build;
tests/training/test_tiny.py fails when its recipe changed without a rebuild.
"""

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config, items):
    """GPU-marked tests skip where CUDA is absent, and only there: `pytest -m gpu` on a GPU machine runs them."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run scripts/gpu_check.sh on a GPU machine)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
