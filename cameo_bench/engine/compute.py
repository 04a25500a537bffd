"""Training compute of a run: FLOPs of one optimizer step, counted once with `FlopCounterMode`, and parameter counts.

Cross-architecture comparisons must be compute-matched: the tiny DiT and UNet differ several-fold in
cost per step, and CAMEO adds the alignment loss (and its head) to every step. So every run logs,
at step 0, `compute/train_flops_per_step`, `compute/params` and `compute/params_head`, and reports
can draw curves against training FLOPs (step x FLOPs per step).

What is counted: one micro-batch of the run's training step, exactly as `engine.step.train_step`
builds it (batch 0, its draws, the correspondence targets, the tap, the forward of backbone +
CAMEO loss, the backward of diffusion loss + weight x alignment loss), multiplied by
`optim.grad_accum` and the world size. `torch.utils.flop_counter` counts matrix products,
convolutions and attention kernels only (2 FLOPs per multiply-add; backward by its formulas,
recomputation under gradient checkpointing included); elementwise work (norms, activations, the
softmax, the optimizer update, the targets' reprojection) adds nothing. On CPU torch runs
`scaled_dot_product_attention` as a kernel that has no formula in torch's table; it is counted
here with torch's own attention formulas (`ATTENTION_FORMULAS`), or attention would count 0.
"""
from __future__ import annotations

import torch
from torch.utils import flop_counter

from cameo_bench.engine.build import Run
from cameo_bench.engine.step import forward_micro_batch, local_batch
from cameo_bench.tracking import keys

_aten = torch.ops.aten


def _sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


ATTENTION_FORMULAS = {  # kernels torch's table misses (shapes in, FLOPs out)
    _aten._scaled_dot_product_flash_attention_for_cpu: _sdpa,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward,
}


def count_flops(fn) -> int:
    """FLOPs of everything `fn()` runs (forward and any backward it calls)."""
    with flop_counter.FlopCounterMode(display=False, custom_mapping=ATTENTION_FORMULAS) as counter:
        fn()
    return int(counter.get_total_flops())


def _one_micro_step(run: Run) -> None:
    """Forward + backward of micro-batch 0 of step 0, as `train_step` runs it, without the update."""
    batch, positions = local_batch(run, 0)
    diff_loss, _, align, _, _ = forward_micro_batch(run, run.step_module, batch, 0, positions)
    total = diff_loss if align is None else diff_loss + run.exp.cameo.weight * align
    total.backward()


def train_flops_per_step(run: Run) -> int:
    """FLOPs of one optimizer step of `run` over all ranks (see the module doc for what counts).

    Leaves the run as it was: the global RNG is restored (`rng_scope`), gradients are dropped, the
    weights and optimizer are untouched, and the train/eval mode is put back. Under torchrun every
    rank must call it (the CAMEO loss may all-reduce its term counts); it runs the unwrapped module,
    so no gradient all-reduce happens.
    """
    module = run.step_module
    was_training = module.training
    module.train()
    try:
        flops = count_flops(lambda: _one_micro_step(run))
    finally:
        for p in module.parameters():
            p.grad = None
        module.train(was_training)
    return flops * max(run.exp.optim.grad_accum, 1) * run.dist.world


def compute_metrics(run: Run) -> dict[str, float]:
    """`compute/*` of a run, to log at step 0."""
    head = sum(p.numel() for p in run.cameo_loss.parameters()) if run.cameo_loss is not None else 0
    return {keys.TRAIN_FLOPS_PER_STEP: float(train_flops_per_step(run)),
            keys.PARAM_COUNT: float(sum(p.numel() for p in run.model.parameters())),
            keys.HEAD_PARAM_COUNT: float(head)}
