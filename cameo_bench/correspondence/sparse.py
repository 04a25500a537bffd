"""Sparse point correspondences -> token targets: what `sfm_tracks` and `depth` on sparse depth share.

Input: a list of matches (sample b, query view i, key view j, pixel uv_i in view i, pixel uv_j in
view j), e.g. one per SfM point seen in both views. A query token holds the matches whose uv_i
lies in its pixel footprint; the modes pick its target in view j like the `depth` source's modes:
  * `center`: the match whose uv_i is nearest the token centre (ties: the first listed), one-hot;
  * `argmax`: the key token most of the token's matches land in (ties: the lower token id), one-hot;
  * `soft`: the k most voted key tokens, weighted by their share of the votes (of those k).
A (query token, key view) pair is valid iff at least one match lies in the token; `cost` is 0
there (the match is exact: both pixels see the same 3D point) and inf elsewhere, so
`onehot_global` ranks every observed key view alike and takes the first.
Matches outside either image are dropped, never clamped onto a border token.
"""
from __future__ import annotations

import torch

from cameo_bench.correspondence.targets import CorrespondenceTargets
from cameo_bench.correspondence.tokens import assemble_all_pairs, pixel_to_token, token_centres
from cameo_bench.geometry import MIN_DEPTH

SPARSE_MODES = ("center", "argmax", "soft")


def _inside(uv: torch.Tensor, H: int, W: int) -> torch.Tensor:  # [n] bool
    return (uv[:, 0] >= -0.5) & (uv[:, 0] < W - 0.5) & (uv[:, 1] >= -0.5) & (uv[:, 1] < H - 0.5)


def point_pairs_to_targets(
    batch_size: int, grid: tuple[int, int, int], stride: int,
    b: torch.Tensor, vi: torch.Tensor, vj: torch.Tensor, uv_i: torch.Tensor, uv_j: torch.Tensor,
    *, mode: str = "center", k: int = 4, device=None,
) -> CorrespondenceTargets:
    """Matches b, vi, vj [n] long and uv_i, uv_j [n, 2] pixels -> targets on grid (V, h, w)."""
    if mode not in SPARSE_MODES:
        raise ValueError(f"unknown sparse target mode {mode!r}; valid modes: {list(SPARSE_MODES)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    V, h, w = grid
    T, H, W = h * w, h * stride, w * stride
    kk = k if mode == "soft" else 1
    idx = torch.zeros(batch_size, V, V, T, kk, dtype=torch.long)
    weight = torch.zeros(batch_size, V, V, T, kk)
    valid = torch.zeros(batch_size, V, V, T, dtype=torch.bool)
    keep = _inside(uv_i, H, W) & _inside(uv_j, H, W) & (vi != vj)
    b, vi, vj, uv_i, uv_j = b[keep].long(), vi[keep].long(), vj[keep].long(), uv_i[keep], uv_j[keep]
    if len(b):
        q = pixel_to_token(uv_i, stride, h, w)  # [n] query token within view i
        t = pixel_to_token(uv_j, stride, h, w)  # [n] target token within view j
        slot = ((b * V + vi) * V + vj) * T + q  # [n] flat (b, i, j, q)
        if mode == "center":
            dist = (uv_i.double() - token_centres(h, w, stride, torch.float64)[q]).norm(dim=-1)
            order = torch.sort(dist, stable=True).indices
            order = order[torch.sort(slot[order], stable=True).indices]  # by slot, then distance, then input order
            first = torch.ones(len(order), dtype=torch.bool)
            first[1:] = slot[order][1:] != slot[order][:-1]
            pick = order[first]
            chosen_slot, chosen_t, chosen_w, rank = slot[pick], t[pick], torch.ones(len(pick)), torch.zeros_like(pick)
        else:
            votes, counts = torch.unique(slot * T + t, return_counts=True)  # sorted by (slot, t)
            vslot, vt = votes // T, votes % T
            order = torch.sort(-counts, stable=True).indices  # most votes first, then lower t
            order = order[torch.sort(vslot[order], stable=True).indices]
            vslot, vt, counts = vslot[order], vt[order], counts[order]
            start = torch.ones(len(vslot), dtype=torch.bool)
            start[1:] = vslot[1:] != vslot[:-1]
            group = start.long().cumsum(0) - 1
            first_pos = torch.nonzero(start).squeeze(1)
            rank = torch.arange(len(vslot)) - first_pos[group]
            top = rank < kk
            chosen_slot, chosen_t, rank = vslot[top], vt[top], rank[top]
            counts = counts[top].float()
            total = torch.zeros(batch_size * V * V * T).index_add_(0, chosen_slot, counts)
            chosen_w = counts / total[chosen_slot]
        flat_idx, flat_w, flat_valid = idx.view(-1, kk), weight.view(-1, kk), valid.view(-1)
        flat_idx[chosen_slot, rank] = chosen_t
        flat_w[chosen_slot, rank] = chosen_w
        flat_valid[chosen_slot] = True
    cost = torch.where(valid, torch.zeros(()), torch.full((), float("inf")))
    targets = assemble_all_pairs(idx, valid, grid, weight=weight, cost=cost)
    return targets if device is None else targets.to(device)


def sparse_depth_pairs(
    sparse_depth: torch.Tensor, intrinsics: torch.Tensor, cam2world: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Every pixel with depth in sparse_depth [B, V, H, W], reprojected into every other view.

    Returns (b, vi, vj, uv_i, uv_j) for `point_pairs_to_targets`. There is no occlusion test:
    sparse depth cannot tell a point hidden in view j from one view j simply has no depth for,
    so a point that is occluded in j still gets a (wrong) target there; `sfm_tracks` uses the
    SfM visibility instead.
    """
    B, V, H, W = sparse_depth.shape
    d = sparse_depth.detach().double().cpu()
    K = intrinsics.detach().double().cpu()
    c2w = cam2world.detach().double().cpu()
    nz = torch.nonzero(torch.isfinite(d) & (d > 0))  # [n, 4] (b, view, row, col)
    bb, ii, rr, cc = nz.unbind(1)
    z = d[bb, ii, rr, cc]
    pix = torch.stack([cc.double(), rr.double(), torch.ones_like(z)], -1)  # [n, 3]
    cam = torch.linalg.solve(K[bb, ii], pix[..., None])[..., 0] * z[:, None]  # K^-1 p z
    world = (c2w[bb, ii, :3, :3] @ cam[..., None])[..., 0] + c2w[bb, ii, :3, 3]
    out = [], [], [], [], []
    for j in range(V):
        other = ii != j
        R, t = c2w[bb[other], j, :3, :3], c2w[bb[other], j, :3, 3]
        cam_j = (R.transpose(-1, -2) @ (world[other] - t)[..., None])[..., 0]  # R^T (X - t)
        front = cam_j[:, 2] > MIN_DEPTH
        proj = (K[bb[other], j] @ cam_j[..., None])[..., 0]
        uv_j = proj[:, :2] / proj[:, 2:].clamp_min(MIN_DEPTH)  # [m, 2]; out-of-image ones are dropped later
        uv_i = torch.stack([cc, rr], -1)[other].double()  # the point's pixel centre in its own view
        for lst, val in zip(out, (bb[other][front], ii[other][front], torch.full((int(front.sum()),), j),
                                  uv_i[front], uv_j[front])):
            lst.append(val)
    return tuple(torch.cat(lst) for lst in out)


def sparse_depth_targets(
    sparse_depth: torch.Tensor, intrinsics: torch.Tensor, cam2world: torch.Tensor,
    grid: tuple[int, int, int], stride: int, *, mode: str = "center", k: int = 4,
) -> CorrespondenceTargets:
    """Targets from sparse depth [B, V, H, W] (0 = no point): each point's pixel, reprojected."""
    pairs = sparse_depth_pairs(sparse_depth, intrinsics, cam2world)
    return point_pairs_to_targets(sparse_depth.shape[0], grid, stride, *pairs, mode=mode, k=k,
                                  device=sparse_depth.device)
