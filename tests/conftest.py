"""Shared test set-up.

The tiny model is small enough that thread start-up costs more than it saves, and on a 2-core
machine the subprocesses that tests start compete with the test process: one thread each.
The built-in tiny model itself is built once into CLARA_HOME (default ~/.cache/clara) by the
first test that needs it and reused by every later test and run.
"""

import os

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
