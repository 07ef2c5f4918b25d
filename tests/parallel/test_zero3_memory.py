"""clara.parallel.zero3: the two corrections that keep a ZeRO-3 step's gathered memory to one layer at a time."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from clara.parallel.zero3 import frozen_weight_linear
from clara.ports import free_port
from tests.helpers import REPO


def saved_elements(run) -> int:
    """Elements of every tensor autograd saves for the backward while `run()` builds its graph."""
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(sizes)


@pytest.mark.parametrize("bias", [False, True])
def test_the_linear_matches_torch_in_values_and_gradients(bias):
    torch.manual_seed(0)
    inputs = torch.randn(3, 5, 8, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(4, 8))
    offset = torch.nn.Parameter(torch.randn(4)) if bias else None
    ours = frozen_weight_linear(inputs, weight, offset)
    grads = torch.autograd.grad(ours.square().sum(), [inputs, weight] + ([offset] if bias else []))
    theirs = torch.nn.functional.linear(inputs, weight, offset)
    expected = torch.autograd.grad(theirs.square().sum(), [inputs, weight] + ([offset] if bias else []))
    torch.testing.assert_close(ours, theirs)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_a_frozen_weight_keeps_no_input_for_the_backward():
    inputs = torch.randn(64, 32, requires_grad=True)
    frozen, trained = torch.randn(16, 32), torch.nn.Parameter(torch.randn(16, 32))
    assert saved_elements(lambda: frozen_weight_linear(inputs, frozen)) == frozen.numel()
    assert saved_elements(lambda: frozen_weight_linear(inputs, trained)) == frozen.numel() + inputs.numel()
    grad = torch.autograd.grad(frozen_weight_linear(inputs, frozen).sum(), inputs)[0]
    torch.testing.assert_close(grad, torch.ones(64, 16) @ frozen)


TWICE = textwrap.dedent("""
    import deepspeed, torch
    from clara.parallel.zero3 import release_after_each_use

    deepspeed.init_distributed(dist_backend="gloo")
    config = {"train_batch_size": 1, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
              "stage3_max_reuse_distance": 0}, "zero_allow_untested_optimizer": True}

    class Twice(torch.nn.Module):
        # A frozen layer run twice in one forward, as the base is (compressor, then generator).
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(64))
            self.layer = torch.nn.Linear(64, 64).requires_grad_(False)

        def forward(self, x):
            first = x * self.scale
            first.register_hook(lambda grad: seen.append(self.layer.weight.ds_status.name))
            return self.layer(self.layer(first) * self.scale).sum()

    seen = []
    model = Twice()
    optimizer = torch.optim.AdamW([model.scale], lr=1e-3)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    if FIX:
        release_after_each_use(model, optimizer)
    engine.backward(engine(torch.randn(2, 64)))
    print("STATUS", seen[0])
""")


@pytest.mark.slow
@pytest.mark.parametrize("fix", [False, True])
def test_a_layer_used_twice_is_freed_after_the_backward_of_each_use(fix):
    """Without the fix, the first use's backward leaves the layer gathered (DeepSpeed's count went below zero)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [sys.executable, "-c", f"FIX = {fix}\n" + TWICE], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    status = result.stdout.split("STATUS ")[-1].strip()
    assert status == ("NOT_AVAILABLE" if fix else "AVAILABLE")
