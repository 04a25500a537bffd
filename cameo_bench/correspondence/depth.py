"""`depth`: the reference target source, ground-truth depth reprojected with an occlusion test.

Where depth and poses are exact, so is the target (up to depth quantisation), and unlike the
point-map nearest neighbour it never keeps a query whose surface is hidden in view j.
The targets' `cost` (what `onehot_global` ranks key views by) is the world distance between the
3D points of the query token's centre pixel and of its target token's centre pixel in view j
(each lifted with its own view's depth), inf where the pair is not valid (out of frame, occluded,
too few visible pixels) or either centre pixel has no depth. Unlike `pointmap_nn`'s nearest
distance it is only defined where the target is: reprojection finds no match in a view that
does not see the point.
Without dense depth the source reads `sparse_depth` (z of SfM points, 0 elsewhere; `depth_key`),
where a token centre almost never has depth: `correspondence/sparse.py` then matches every point
pixel, with no occlusion test in view j (`sfm_tracks` uses SfM's visibility instead).
"""
from __future__ import annotations

import torch
from einops import rearrange

from cameo_bench.correspondence.registry import batch_key, register_source
from cameo_bench.correspondence.sparse import sparse_depth_targets
from cameo_bench.correspondence.targets import CorrespondenceTargets
from cameo_bench.correspondence.tokens import (
    assemble,
    assemble_all_pairs,
    centre_offset,
    group_patches,
    histogram_topk,
    pixel_to_token,
    subsample_intrinsics,
    view_pairs,
)
from cameo_bench.geometry import reproject, unproject

MODES = ("center", "argmax", "soft")
DEPTH_KEYS = ("depth", "intrinsics", "cam2world")
SPARSE_DEPTH_KEYS = ("sparse_depth", "intrinsics", "cam2world")
DEPTH_KEY_CHOICES = ("auto", "depth", "sparse_depth")
_MAX_PIXELS_PER_CHUNK = 1 << 22


def _centre_points(depth: torch.Tensor, intrinsics: torch.Tensor, cam2world: torch.Tensor, stride: int):
    """World points [B, V, h*w, 3] of the token centre pixels and whether their depth is valid
    [B, V, h*w]: the 3D position a token stands for in the match cost."""
    off = centre_offset(stride)
    depth_c = depth[..., off::stride, off::stride]  # [B, V, h, w]
    points = unproject(depth_c, subsample_intrinsics(intrinsics, stride, off), cam2world)  # [B, V, h, w, 3]
    ok = torch.isfinite(depth_c) & (depth_c > 0)
    return rearrange(points, "b v h w c -> b v (h w) c"), rearrange(ok, "b v h w -> b v (h w)")


def _match_cost(points, ok, query_view, key_view, target, valid) -> torch.Tensor:
    """||X_query - X_target|| per pair, inf where the pair is invalid or a centre has no depth.

    points/ok from `_centre_points`; query_view/key_view index their view axis (broadcasting
    against each other: [V, 1] and [1, V], or [P] and [P]); target [B, ..., T] the target token
    in the key view, valid like it. Returns a float tensor shaped like target.
    """
    X_q, ok_q = points[:, query_view], ok[:, query_view]  # [B, ..., T, 3]
    X_k, ok_k = points[:, key_view], ok[:, key_view]
    X_q, X_k = torch.broadcast_tensors(X_q, X_k)
    ok_q, ok_k = torch.broadcast_tensors(ok_q, ok_k)
    X_t = torch.gather(X_k, -2, target[..., None].expand(*target.shape, 3))  # [B, ..., T, 3]
    ok_t = torch.gather(ok_k, -1, target)
    dist = (X_q - X_t).norm(dim=-1)
    return torch.where(valid & ok_q & ok_t, dist, torch.full_like(dist, float("inf")))


def depth_targets(
    depth: torch.Tensor,
    intrinsics: torch.Tensor,
    cam2world: torch.Tensor,
    grid: tuple[int, int, int],
    stride: int,
    *,
    mode: str = "center",
    k: int = 4,
    min_visible: float = 0.5,
    rel_tol: float = 0.02,
) -> CorrespondenceTargets:
    """Reprojection targets from depth [B, V, H, W], intrinsics [B, V, 3, 3], cam2world [B, V, 4, 4].

    Modes:
      * `center`: one-hot at the token where the query token's centre pixel lands; valid iff that
        pixel is visible in view j. Cheapest (one pixel per token).
      * `argmax`: one-hot at the peak of the patch histogram (where all s*s pixels land).
      * `soft`: the k largest histogram bins, normalised to sum to 1 over those k.
    For the histogram modes a query is valid iff at least `min_visible` of its pixels are visible.
    `rel_tol` is the occlusion test's relative z tolerance (see `geometry.reproject`).
    `cost` is the centre-to-centre 3D distance of the (heaviest) target (module docstring).
    """
    if mode not in MODES:
        raise ValueError(f"unknown depth target mode {mode!r}; valid modes: {list(MODES)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    V, h, w = grid
    B = depth.shape[0]

    if mode == "center":
        off = centre_offset(stride)
        depth_c = depth[..., off::stride, off::stride]  # [B, V, h, w]: one pixel per token
        K_c = subsample_intrinsics(intrinsics, stride, off)  # its pixel grid is the token grid
        # All V x V pairs by broadcasting (query view on dim 1, key view on dim 2): each key view's
        # depth map is then read once, not copied per pair, which costs more than the V wasted
        # own-view pairs (dropped right after).
        uv, ok = reproject(
            depth_c[:, :, None], K_c[:, :, None], cam2world[:, :, None],
            intrinsics[:, None], cam2world[:, None], depth_j=depth[:, None], rel_tol=rel_tol,
        )  # [B, V, V, h, w, 2], [B, V, V, h, w]
        idx = rearrange(pixel_to_token(uv, stride, h, w), "b vi vj h w -> b vi vj (h w) 1")
        ok = rearrange(ok, "b vi vj h w -> b vi vj (h w)")
        views = torch.arange(V, device=depth.device)
        cost = _match_cost(*_centre_points(depth, intrinsics, cam2world, stride),
                           views[:, None], views[None, :], idx[..., 0], ok)  # [B, V, V, hw]
        return assemble_all_pairs(idx, ok, grid, cost=cost)

    # Every pixel of every pair: bound the temporaries at paper scale (512^2 px, 12 pairs) by
    # running the flattened (sample, pair) axis in chunks; at CPU sizes this is one chunk.
    vi, vj = view_pairs(V, depth.device)
    P = vi.numel()
    K_j, c2w_j, depth_j = intrinsics[:, vj], cam2world[:, vj], depth[:, vj]  # [B, P, ...]
    kk = 1 if mode == "argmax" else k
    flat = lambda x: x.flatten(0, 1)  # noqa: E731  [B, P, ...] -> [B*P, ...]
    inputs = tuple(
        flat(x) for x in (depth[:, vi], intrinsics[:, vi], cam2world[:, vi], K_j, c2w_j, depth_j)
    )
    H, W = depth.shape[-2:]
    chunk = max(1, _MAX_PIXELS_PER_CHUNK // (H * W))
    parts = []
    for start in range(0, B * P, chunk):
        d_i, K_i, T_i, K_jc, T_j, d_j = (x[start : start + chunk] for x in inputs)
        uv, ok = reproject(d_i, K_i, T_i, K_jc, T_j, depth_j=d_j, rel_tol=rel_tol)  # [m, H, W, 2], [m, H, W]
        tokens = group_patches(pixel_to_token(uv, stride, h, w), stride)  # [m, hw, s*s]
        visible = group_patches(ok, stride)  # [m, hw, s*s]
        parts.append(
            histogram_topk(tokens.flatten(0, 1), visible.flatten(0, 1), kk, h * w)
        )  # idx [m*hw, kk], counts [m*hw, kk], num_visible [m*hw]
    idx, counts, num_visible = (torch.cat(x) for x in zip(*parts))
    valid = num_visible >= min_visible * stride * stride
    weight = counts / counts.sum(-1, keepdim=True).clamp(min=1)
    shape = (B, P, h * w)
    idx, valid = idx.reshape(*shape, kk), valid.reshape(shape)
    cost = _match_cost(*_centre_points(depth, intrinsics, cam2world, stride), vi, vj, idx[..., 0], valid)
    return assemble(idx, weight.reshape(*shape, kk), valid, grid, vi, vj, cost=cost)


@register_source("depth", requires=(DEPTH_KEYS, SPARSE_DEPTH_KEYS))
def depth_source(
    batch,
    grid,
    stride,
    *,
    mode: str = "center",
    k: int = 4,
    min_visible: float = 0.5,
    rel_tol: float = 0.02,
    depth_key: str = "auto",
) -> CorrespondenceTargets:
    """Reprojection of ground-truth depth with an occlusion test (the default source).

    `depth_key`: `auto` = dense `depth` when the batch has it, else `sparse_depth`.
    """
    key = batch_key(batch, "depth_key", depth_key, DEPTH_KEY_CHOICES, preferred="depth", fallback="sparse_depth",
                    source="depth")
    if key == "sparse_depth":
        return sparse_depth_targets(batch["sparse_depth"], batch["intrinsics"], batch["cam2world"], grid, stride,
                                    mode=mode, k=k)
    return depth_targets(
        batch["depth"], batch["intrinsics"], batch["cam2world"], grid, stride,
        mode=mode, k=k, min_visible=min_visible, rel_tol=rel_tol,
    )
