"""The control sources for causality claims: `shuffled` (right statistics, wrong geometry) and `none`.

If CAMEO helps only because an auxiliary attention loss regularises the layer, `shuffled` should
help as much as `depth`; if it helps because of the geometry, it should not.
"""
from __future__ import annotations

import torch
from einops import rearrange

from cameo_bench.correspondence.depth import DEPTH_KEYS, depth_targets
from cameo_bench.correspondence.registry import register_source
from cameo_bench.correspondence.targets import CorrespondenceTargets


def shuffle_targets(targets: CorrespondenceTargets, seed: int) -> CorrespondenceTargets:
    """Permute the targets among the valid queries of each (sample, key view).

    The validity mask, the number of targets and the histogram of target tokens per key view are
    unchanged; which query gets which target is random. A `cost` travels with its target (the
    same permutation): its statistics per key view stay, and `onehot_global` can no longer pick
    the view by the true geometry either. Vectorised: sorting the valid entries by group +
    U(0, 1) draws a uniform permutation inside every group at once.
    """
    B, N, V, k = targets.idx.shape
    generator = torch.Generator().manual_seed(seed)
    valid = rearrange(targets.valid, "b n v -> (b v n)")  # grouped by (sample, key view)
    group = torch.arange(B * V).repeat_interleave(N).to(valid.device)  # [(b v n)]
    pos = valid.nonzero().squeeze(1)  # valid entries in group order
    noise = torch.rand(pos.numel(), generator=generator, dtype=torch.float64).to(valid.device)
    perm = pos[torch.argsort(group[pos].double() + noise)]  # a permutation within each group

    def permute(x: torch.Tensor) -> torch.Tensor:
        flat = rearrange(x, "b n v k -> (b v n) k").clone()
        flat[pos] = flat[perm]
        return rearrange(flat, "(b v n) k -> b n v k", b=B, v=V)

    cost = None if targets.cost is None else permute(targets.cost[..., None])[..., 0]
    return CorrespondenceTargets(
        permute(targets.idx), permute(targets.weight), targets.valid.clone(), targets.grid, cost
    )


@register_source("shuffled", requires=(DEPTH_KEYS,))
def shuffled_source(batch, grid, stride, *, seed: int = 0, mode: str = "center", k: int = 4,
                    min_visible: float = 0.5, rel_tol: float = 0.02) -> CorrespondenceTargets:
    """`depth` targets permuted among the valid queries of the same key view (control).

    `seed` fixes the generator: the permutation is a function of the batch's validity pattern,
    so the same batch always gets the same wrong targets.
    """
    targets = depth_targets(
        batch["depth"], batch["intrinsics"], batch["cam2world"], grid, stride,
        mode=mode, k=k, min_visible=min_visible, rel_tol=rel_tol,
    )
    return shuffle_targets(targets, seed)


@register_source("none", requires=((),))
def none_source(batch, grid, stride) -> None:
    """Baseline without correspondence supervision: returns None, and the engine runs no tap."""
    return None
