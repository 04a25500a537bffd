"""torchrun/DDP plumbing: the process group, collectives, and per-sample seeds that make N ranks train like one.

`torchrun --nproc_per_node=N -m cameo_bench train ...` runs the ordinary training loop on every
rank; each rank takes its slice of the global batch and DDP averages gradients. "Exactly like one
process with the same global batch" (tests/test_ddp.py checks it to 1e-5) needs:

1. Draws per global sample, not per rank. A sample's t, camera drop, noise and query sampling come
   from a generator seeded by (seed, batch number, position in the global batch), so they do not
   depend on which rank holds the sample or on the world size; a checkpoint resumes on any number
   of ranks. The alternative, every rank drawing the whole global batch and slicing, makes each
   rank draw world-size times the noise it uses. Per-sample generators cost a few microseconds
   each and give every rank (indeed every sample) its own noise, which is what per-rank seeds
   are for. Anything left on torch's global generator (dropout; `noisy_depth` without a seed)
   is reseeded per (batch, shard), and sources that draw over the whole local batch at once
   (`noisy_depth`, `shuffled`) see a different split on a different world size: for them only the
   distribution, not each draw, is world-size invariant.
2. Global loss normalisers. Both losses are means over terms (target views; supervised CAMEO
   pairs), and the number of terms differs between ranks (occlusion decides how many CAMEO pairs a
   scene has). DDP averages gradients, so each rank scales its local mean by
   world * local_count / global_count: the average over ranks is then the mean over the global
   batch. One all-reduce of a few scalars per loss and micro-step; the CAMEO loss gets its global
   term counts through the `reduce_term_counts` hook.
3. Decisions are global. Skipping a non-finite step is decided from an all-reduced flag, never from
   one rank's value; a rank that skipped alone would leave the others waiting in the gradient
   all-reduce forever.

The CAMEO head's parameters live in the same DDP-wrapped module as the backbone
(`cameo_bench.engine.build.StepModule`) and the loss runs on every rank at every step, so DDP needs no
`find_unused_parameters`.
"""
from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

_UINT64 = (1 << 64) - 1
# Ranks > 0 wait in a barrier while rank 0 evaluates or writes a checkpoint; NCCL's default 10
# minutes can be shorter than a paper-scale evaluation.
TIMEOUT = datetime.timedelta(hours=1)


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_distributed(device: str | torch.device | None = None) -> tuple[DistInfo, torch.device]:
    """(rank info, this rank's device). torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; without them a
    plain `python -m cameo_bench train` stays single-process. NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if world <= 1:
        return DistInfo(), device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank), device


def barrier() -> None:
    if active():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy; the input is left alone). Identity in a single process."""
    if not active():
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values


def shutdown(exit_code: int = 0) -> int:
    """End a torchrun worker: barrier -> destroy the process group -> flush -> `os._exit`.

    A gloo worker that leaves through normal interpreter exit sometimes aborts ("terminate called
    without an active exception", ~8% of runs measured) because gloo threads still hold tensors
    while the interpreter finalises; `os._exit` after an orderly teardown never did (0/30,
    notes/scale_and_tracking.md 1.2). Single process: returns `exit_code` and exits nothing.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return exit_code
    try:
        if exit_code == 0:  # after an error the other ranks may never reach the barrier
            dist.barrier()
        dist.destroy_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)


# ---------------------------------------------------------------------------------------------
# world-size invariant randomness


def sample_seed(seed: int, batch_no: int, position: int) -> int:
    """A 64-bit seed for one sample of one (micro-)batch. SeedSequence mixes the three numbers, so
    nearby keys give unrelated streams and no two keys collide in practice."""
    words = np.random.SeedSequence([seed & _UINT64, batch_no, position]).generate_state(2, np.uint32)
    return int(words[0]) | int(words[1]) << 32


def sample_generators(seed: int, batch_no: int, positions: range | list[int]) -> list[torch.Generator]:
    """One CPU generator per global-batch position (CPU, so CUDA runs draw the same numbers)."""
    return [torch.Generator().manual_seed(sample_seed(seed, batch_no, p)) for p in positions]


# ---------------------------------------------------------------------------------------------
# global normalisation of the CAMEO loss


def reduce_term_counts(counts: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(global counts [2], world size) from this rank's CAMEO term counts [2] (reference-query
    terms, target-query terms): the hook `CameoLoss(reduce_counts=...)` calls in training mode, so
    each group's mean runs over the whole global batch (rule 2 above). Every rank must call it, at
    every step, in the same order (it is a collective)."""
    if not active():
        return counts, 1
    return all_reduce_sum(counts), dist.get_world_size()
