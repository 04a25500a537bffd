"""Multi-view consistency of generated views: colour error after warping one view into another by the true geometry.

A model can score well on PSNR per view while its target views disagree with each other; warping by
the ground-truth depth and cameras measures that disagreement directly. The same error on the
ground-truth images is the floor (occlusion edges and resampling make it nonzero).
"""
from __future__ import annotations

import torch

from cameo_bench import geometry


def warp_error(images: torch.Tensor, batch: dict, pairs: list[tuple[int, int]]) -> torch.Tensor:  # [P]
    """Absolute colour difference (mean over channels) at every pixel of view i that lands in view j,
    with view j warped into i by the batch's depth and cameras, pooled over `pairs` (i, j).

    images [B, V, 3, H, W]; returns the differences of all valid pixels, empty when none lands.
    """
    depth, K, c2w = batch["depth"], batch["intrinsics"], batch["cam2world"]
    H, W = images.shape[-2:]
    errors = []
    for i, j in pairs:
        uv, ok = geometry.reproject(depth[:, i], K[:, i], c2w[:, i], K[:, j], c2w[:, j], depth[:, j])
        grid = torch.stack([uv[..., 0] / (W - 1) * 2 - 1, uv[..., 1] / (H - 1) * 2 - 1], -1)  # [B, H, W, 2]
        warped = torch.nn.functional.grid_sample(images[:, j].float(), grid.float(), align_corners=True)
        diff = (warped - images[:, i].float()).abs().mean(1)  # [B, H, W]
        if ok.any():
            errors.append(diff[ok])
    return torch.cat(errors) if errors else torch.zeros(0)


def consistency_pairs(num_views: int, num_ref: int) -> list[tuple[int, int]]:
    """Ordered pairs of generated views; with a single target, the target against each reference
    (the only other views there are)."""
    targets = list(range(num_ref, num_views))
    if len(targets) >= 2:
        return [(i, j) for i in targets for j in targets if i != j]
    return [(t, r) for t in targets for r in range(num_ref)]
