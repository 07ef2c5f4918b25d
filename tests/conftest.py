"""Shared test set-up.

The tiny model is small enough that thread start-up costs more than it saves, and on a 2-core
machine the subprocesses that tests start compete with the test process: one thread each.
The built-in tiny model ships in clara/tiny_model, so no test waits for a build;
tests/test_tiny.py fails when its recipe changed without a rebuild.
"""

import os

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
