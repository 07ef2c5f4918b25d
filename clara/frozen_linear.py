"""The linear layer under ZeRO-3, keeping for the backward only what the backward needs.

`deepspeed.zero.Init` (which transformers uses to load a base partitioned) replaces
`torch.nn.functional.linear` with a function that saves each layer's input for the backward, so that
the weight's gradient can be computed. Under LoRA almost every weight is frozen: that gradient is never
computed, and the saved inputs (one per linear layer of the base, all layers at once) are the largest
thing a ZeRO-3 step adds. This function saves the input only when the weight trains; like DeepSpeed's,
it saves the parameter itself rather than its gathered values, so the gathered weight is freed after
the forward and gathered again for the backward.
"""

from __future__ import annotations

import torch


def _partitioned_away(weight: torch.Tensor) -> bool:
    """Whether ZeRO-3 has released this parameter's gathered values (its status NOT_AVAILABLE)."""
    return getattr(getattr(weight, "ds_status", None), "name", None) == "NOT_AVAILABLE"


class FrozenWeightLinear(torch.autograd.Function):
    """y = x W^T + b, with x kept for the backward only where W (or b) needs a gradient."""

    @staticmethod
    def forward(ctx, inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
        kept = inputs if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(kept, weight, bias)
        output = inputs.matmul(weight.t())
        return output + bias if bias is not None else output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        inputs, weight, bias = ctx.saved_tensors
        grad_inputs = grad_weight = grad_bias = None
        regather = _partitioned_away(weight)
        if regather:
            weight.all_gather()
        try:
            if ctx.needs_input_grad[0]:
                grad_inputs = grad_output.matmul(weight)
            if ctx.needs_input_grad[1]:
                grad_weight = grad_output.reshape(-1, grad_output.shape[-1]).t().matmul(
                    inputs.reshape(-1, inputs.shape[-1]))
            if bias is not None and ctx.needs_input_grad[2]:
                grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0)
        finally:
            if regather:
                weight.partition()
        return grad_inputs, grad_weight, grad_bias


def frozen_weight_linear(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return FrozenWeightLinear.apply(inputs, weight, bias)


def use_frozen_weight_linear() -> None:
    """Put frozen_weight_linear in place of the linear that deepspeed.zero.Init installs; a no-op where
    that one is not installed (ZeRO 0-2 keep PyTorch's, which already saves only what it needs)."""
    from deepspeed.runtime.zero.linear import zero3_linear_wrap

    if torch.nn.functional.linear is zero3_linear_wrap:
        torch.nn.functional.linear = frozen_weight_linear
