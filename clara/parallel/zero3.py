"""ZeRO-3 (parameters partitioned over the ranks) where it differs from ZeRO-2: loading the same random
draws, how much may stay gathered, and what a step keeps gathered, with two corrections to DeepSpeed for a LoRA
model whose frozen base runs twice in each forward (once as the compressor, once as the generator).

The linear layer. `deepspeed.zero.Init` (which transformers uses to load a base partitioned) replaces
`torch.nn.functional.linear` with a function that saves each layer's input for the backward, so that
the weight's gradient can be computed. Under LoRA almost every weight is frozen: that gradient is never
computed, and the saved inputs (one per linear layer of the base, all layers at once) are the largest
thing a ZeRO-3 step adds. This function saves the input only when the weight trains; like DeepSpeed's,
it saves the parameter itself rather than its gathered values, so the gathered weight is freed after
the forward and gathered again for the backward.
"""

from __future__ import annotations

import torch

from clara.parallel.distributed import partitioned


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
                grad_weight = (
                    grad_output.reshape(-1, grad_output.shape[-1]).t().matmul(inputs.reshape(-1, inputs.shape[-1]))
                )
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


def gathering_limits(model, on_cuda: bool) -> dict:
    """ZeRO-3: how many parameters may stay gathered. DeepSpeed's defaults keep up to 1e9 gathered, and
    keep any that the backward uses again within 1e9 others: a model of fewer parameters stays whole on
    every rank, and ZeRO-3 saves nothing. Here: at most two of the largest unit a forward gathers (a
    transformer layer with its adapters, or the embedding matrix), gathered again for the backward.
    Prefetching overlaps the gathers with compute on CUDA; with gloo on the CPU it measured slower.
    """

    def size(module) -> int:
        return sum(full_numel(p) for p in module.parameters())

    unit = max(max(size(layer) for layer in model.backbone.layers), size(model.causal_lm.get_input_embeddings()))
    return {
        "stage3_max_live_parameters": min(2 * unit, 10**9),
        "stage3_max_reuse_distance": 0,
        "stage3_prefetch_bucket_size": min(unit, 5 * 10**7) if on_cuda else 0,
    }


def keep_gathered_until_step(module: torch.nn.Module, param: torch.nn.Parameter) -> None:
    """ZeRO-3: gather `param` with `module`'s forward and keep it whole until the optimizer step.

    ZeRO-3 gathers a module's parameters before its forward, frees them after it and gathers them again
    before the module's backward, which it finds through the tensors the forward returns. The memory
    embeddings belong to ClaraModel itself, whose forward returns a StepOutput that DeepSpeed cannot
    look into: freed after the forward, they would be missing in the backward. As an "external
    parameter" they are gathered with the forward and freed only by the step, which repartitions all.
    """
    import deepspeed

    deepspeed.zero.register_external_parameter(module, param)
    param.is_external_param = True  # what DeepSpeed's own detection of such parameters sets


def release_after_each_use(model: torch.nn.Module, zero3_optimizer) -> None:
    """Free each module's gathered parameters after the backward of each of its uses, not only the last.

    DeepSpeed counts, per module, the inputs whose gradients are still to come, and frees the module's
    gathered parameters when that count reaches zero. Every forward resets the count, so for a module
    that runs twice (compressor, then generator) the generator's backward brings it to zero and the
    compressor's takes it below zero: the compressor pass's gathered layers then stay whole until the
    backward ends (measured: every layer at once, a third of a 0.3B model's weights per rank). Here each
    forward's inputs get a count of their own, and each use's backward frees what it gathered.
    """
    offload = zero3_optimizer.parameter_offload
    for module in model.modules():
        if "post_bwd_fn" in module.__dict__:
            module.post_bwd_fn = _per_use_release(module, offload.post_sub_module_backward_function)


def _per_use_release(module: torch.nn.Module, release) -> type[torch.autograd.Function]:
    """The autograd function DeepSpeed applies to each input of `module`'s forward, counting per forward."""

    class ReleaseAfterThisUse(torch.autograd.Function):
        @staticmethod
        def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
            ctx.pending = None
            if ctx.needs_input_grad[0]:
                # DeepSpeed sets the count to zero before each forward: the first input of a forward.
                if module.ds_grads_remaining == 0:
                    module.clara_pending_inputs = [0]
                module.ds_grads_remaining += 1
                module.clara_pending_inputs[0] += 1
                ctx.pending = module.clara_pending_inputs
            return tensor.detach()

        @staticmethod
        def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
            if ctx.pending is not None:
                module.ds_grads_remaining -= 1
                ctx.pending[0] -= 1
                if ctx.pending[0] == 0:
                    release(module)
            return grad

    return ReleaseAfterThisUse


def resize_embeddings(base, rows: int) -> None:
    """Grow (or shrink) the embedding matrices to `rows`, leaving the random state as ZeRO-2 leaves it.

    The draws after loading (added rows, adapters) must be the same under every ZeRO stage. Unpartitioned,
    transformers draws a new input matrix (and a new LM head only when untied); partitioned (ZeRO-3) it
    also draws a new head for a tied model, and may draw on the GPU. So a partitioned resize runs on a
    forked random state, and the unpartitioned draws are then made on throwaway CPU copies.
    """
    embedding, head = base.get_input_embeddings(), base.get_output_embeddings()
    if not partitioned(embedding.parameters()):
        base.resize_token_embeddings(rows, mean_resizing=False)
        return
    tied = head is None or head.weight is embedding.weight
    dtype, width = embedding.weight.dtype, full_shape(embedding.weight)[1]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices):
        base.resize_token_embeddings(rows, mean_resizing=False)
    base._init_weights(torch.nn.Embedding(rows, width, dtype=dtype))
    if not tied:
        base._init_weights(torch.nn.Linear(width, rows, bias=head.bias is not None, dtype=dtype))


def full_numel(param: torch.Tensor) -> int:
    """A parameter's size, also when ZeRO-3 has partitioned it."""
    return getattr(param, "ds_numel", param.numel())


def full_shape(param: torch.Tensor) -> torch.Size:
    """A parameter's shape, also when ZeRO-3 has partitioned it (its local tensor is then empty)."""
    return getattr(param, "ds_shape", param.shape)
