"""`epipolar`: the soft-only source of a band along the epipolar line, from poses alone.

Every posed dataset (RealEstate10K, DL3DV, ...) can feed it, but it is a 1-D constraint: the target
spreads its mass over the tokens near the line (typically 10-30 of them), so the true token gets a
small share. Use it with a soft target loss; an argmax one-hot of it picks an arbitrary line token.

Instead of the infinite line l = F p we use the part of it that can hold the correspondence: the
projections of the query ray's points at depths d in [d_min, d_max] that lie in front of camera j.
With the defaults (0, inf) that is the half-line from the epipole to the ray's vanishing point; for
a pure rotation it collapses to the single homography point K_j R K_i^-1 p, where the epipolar
line itself is undefined. The targets carry no `cost`: a band holds no single match.
"""
from __future__ import annotations

import torch

from cameo_bench.correspondence.registry import register_source
from cameo_bench.correspondence.targets import CorrespondenceTargets
from cameo_bench.correspondence.tokens import assemble, token_centres, view_pairs
from cameo_bench.geometry import relative_pose

WEIGHTINGS = ("uniform", "gaussian")


def ray_segments(
    K_i: torch.Tensor, T_ji: torch.Tensor, K_j: torch.Tensor, uv: torch.Tensor, d_min: float, d_max: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image-j segment of the rays through pixels uv [T, 2] of view i.

    K_i, K_j [..., 3, 3], T_ji [..., 4, 4] (camera i -> camera j). The ray point at z-depth d is
    d R r + t with r = K_i^-1 [u, v, 1]; its camera-j depth a d + c is affine in d, so the visible
    depth range is an interval. Returns (p0, p1 [..., T, 2] segment ends in pixels of view j,
    ok [..., T]: part of the ray is in front of camera j). Works in float64: an end at the plane
    z_j = eps projects far away.
    """
    dt = torch.float64
    K_i, T_ji, K_j, uv = K_i.to(dt), T_ji.to(dt), K_j.to(dt), uv.to(dt)
    uv1 = torch.cat([uv, torch.ones_like(uv[:, :1])], dim=-1)  # [T, 3]
    r = torch.einsum("...ab,tb->...ta", torch.linalg.inv(K_i), uv1)  # [..., T, 3], z = 1
    Rr = torch.einsum("...ab,...tb->...ta", T_ji[..., :3, :3], r)  # direction in camera j
    t = T_ji[..., None, :3, 3]  # [..., 1, 3]
    a, c = Rr[..., 2], t[..., 2].expand_as(Rr[..., 2])  # z_j(d) = a d + c
    eps = 1e-6
    lo = torch.full_like(a, d_min)
    hi = torch.full_like(a, d_max)
    root = (eps - c) / torch.where(a == 0, torch.ones_like(a), a)  # where z_j(d) = eps
    lo = torch.where(a > 0, torch.maximum(lo, root), lo)
    hi = torch.where(a < 0, torch.minimum(hi, root), hi)
    ok = (lo < hi) & ((a != 0) | (c > eps))

    def project(d: torch.Tensor) -> torch.Tensor:
        # d = inf -> the vanishing point K Rr / a (only reached when a > 0).
        finite = torch.isfinite(d)
        d_safe = torch.where(finite, d, torch.zeros_like(d))
        X = torch.where(finite[..., None], d_safe[..., None] * Rr + t, Rr)
        hom = torch.einsum("...ab,...tb->...ta", K_j, X)
        return hom[..., :2] / hom[..., 2:].clamp(min=eps) * (hom[..., 2:] > 0)

    return project(lo), project(hi), ok


def clip_segments(
    p0: torch.Tensor, p1: torch.Tensor, lo: float, hi: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clip segments [..., 2] to the box [lo, hi]^2 (Liang-Barsky). Returns (q0, q1, nonempty).

    Distances to tokens farther than the box margin do not matter, and bounded endpoints let the
    dense distance computation run in float32.
    """
    d = p1 - p0
    t_lo = torch.zeros_like(p0[..., 0])
    t_hi = torch.ones_like(p0[..., 0])
    inside = torch.ones_like(t_lo, dtype=torch.bool)
    for axis in range(2):
        da, pa = d[..., axis], p0[..., axis]
        moving = da != 0
        safe = torch.where(moving, da, torch.ones_like(da))
        t1, t2 = (lo - pa) / safe, (hi - pa) / safe
        t_lo = torch.where(moving, torch.maximum(t_lo, torch.minimum(t1, t2)), t_lo)
        t_hi = torch.where(moving, torch.minimum(t_hi, torch.maximum(t1, t2)), t_hi)
        inside = inside & (moving | ((pa >= lo) & (pa <= hi)))
    nonempty = inside & (t_lo <= t_hi)
    return p0 + t_lo[..., None] * d, p0 + t_hi[..., None] * d, nonempty


def point_segment_distance(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance from points p [..., 2] to segments a-b [..., 2] (broadcasting) -> [...]."""
    d = b - a
    t = (((p - a) * d).sum(-1) / (d * d).sum(-1).clamp(min=1e-18)).clamp(0, 1)
    return (p - a - t[..., None] * d).norm(dim=-1)


def segment_distance_grid(q0: torch.Tensor, q1: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Distance from every token centre of an h x w grid to segments q0, q1 [..., 2] in token
    coordinates -> [..., h*w]. Dense: used only where a band overflows its k slots."""
    a, b = torch.meshgrid(torch.arange(h, dtype=q0.dtype), torch.arange(w, dtype=q0.dtype), indexing="ij")
    grid = torch.stack([b, a], dim=-1).reshape(h * w, 2).to(q0.device)  # (col, row)
    return point_segment_distance(grid, q0[..., None, :], q1[..., None, :])


def band_intervals(
    q0: torch.Tensor, q1: torch.Tensor, band: float, h: int, w: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per key-token row, the columns [lo, hi] of the token centres within `band` of each segment.

    q0, q1 [M, T, 2] in token coordinates (float64). The band around a segment is a capsule
    (a slab plus two end disks), which is convex, so its intersection with a row of centres is
    one interval: the union of the pieces' intervals. Returns lo, hi [M, T, h] long (empty rows
    have hi < lo). This avoids the dense [M, T, h*w] distance map, the cost of a naive version.
    """
    inf = torch.tensor(float("inf"), dtype=q0.dtype, device=q0.device)
    rows = torch.arange(h, dtype=q0.dtype, device=q0.device)
    ax, ay, bx, by = (x[..., None] for x in (q0[..., 0], q0[..., 1], q1[..., 0], q1[..., 1]))  # [M, T, 1]

    def disk(cx, cy):
        r2 = band**2 - (rows - cy) ** 2
        half = r2.clamp(min=0).sqrt()
        return torch.where(r2 >= 0, cx - half, inf), torch.where(r2 >= 0, cx + half, -inf)

    lo_a, hi_a = disk(ax, ay)
    lo_b, hi_b = disk(bx, by)
    dx, dy = bx - ax, by - ay
    length = torch.sqrt(dx * dx + dy * dy)
    ux, uy = dx / length.clamp(min=1e-12), dy / length.clamp(min=1e-12)
    lo_s = torch.full_like(lo_a, -float("inf"))
    hi_s = torch.full_like(lo_a, float("inf"))
    nonempty = (length > 1e-12).expand_as(lo_a).clone()
    # Slab: lower <= coef * (x - ax) + (row - ay) * other <= upper, once along u, once across it.
    for coef, other, lower, upper in ((ux, uy, 0.0, length), (uy, -ux, -band, band)):
        const = (rows - ay) * other
        zero = coef.abs() < 1e-12
        safe = torch.where(zero, torch.ones_like(coef), coef)
        x1, x2 = ax + (lower - const) / safe, ax + (upper - const) / safe
        lo_s = torch.where(zero, lo_s, torch.maximum(lo_s, torch.minimum(x1, x2)))
        hi_s = torch.where(zero, hi_s, torch.minimum(hi_s, torch.maximum(x1, x2)))
        nonempty &= ~zero | ((const >= lower - 1e-12) & (const <= upper + 1e-12))
    nonempty &= lo_s <= hi_s  # an empty slab interval must not widen the union
    lo_s = torch.where(nonempty, lo_s, inf)
    hi_s = torch.where(nonempty, hi_s, -inf)
    lo = torch.minimum(torch.minimum(lo_a, lo_b), lo_s)
    hi = torch.maximum(torch.maximum(hi_a, hi_b), hi_s)
    lo = torch.ceil(lo - 1e-9).clamp(0, w).nan_to_num(w, w, w).long()  # empty -> [w, -1]
    hi = torch.floor(hi + 1e-9).clamp(-1, w - 1).nan_to_num(-1, -1, -1).long()
    return lo, hi


def band_tokens(q0: torch.Tensor, q1: torch.Tensor, band: float, k: int, h: int, w: int, with_distance: bool = True):
    """The key tokens within `band` tokens of each segment, packed into k slots.

    Returns idx [M, T, k] (row-major token ids), dist [M, T, k] (tokens; 0 in empty slots) and
    filled [M, T, k]. dist is None unless `with_distance` (only Gaussian weights need it).
    Rows of intervals are concatenated in order; the rare queries whose band holds more than k
    tokens keep the k nearest instead (dense fallback).
    """
    lo, hi = band_intervals(q0, q1, band, h, w)  # [M, T, h]
    count = (hi - lo + 1).clamp(min=0)
    ends = count.cumsum(-1)  # inclusive
    slots = torch.arange(k, device=q0.device).expand(*count.shape[:-1], k).contiguous()  # [M, T, k]
    row = torch.searchsorted(ends, slots, right=True).clamp(max=h - 1)
    start = torch.gather(ends - count, -1, row)
    col = torch.gather(lo, -1, row) + slots - start
    filled = slots < ends[..., -1:]
    idx = torch.where(filled, row * w + col.clamp(0, w - 1), torch.zeros_like(row))
    dist = None
    if with_distance:
        centres = torch.stack([idx % w, idx // w], dim=-1).to(q0.dtype)
        dist = point_segment_distance(centres, q0[..., None, :], q1[..., None, :]) * filled  # [M, T, k]
    crowded = ends[..., -1] > k
    if crowded.any():
        near_d, near_i = segment_distance_grid(q0[crowded], q1[crowded], h, w).topk(k, dim=-1, largest=False)
        idx[crowded], filled[crowded] = near_i, near_d <= band
        if dist is not None:
            dist[crowded] = near_d * filled[crowded]
    return idx, dist, filled


@register_source("epipolar", requires=(("intrinsics", "cam2world"),), soft_only=True)
def epipolar_source(
    batch,
    grid,
    stride,
    *,
    band: float = 0.75,
    k: int | None = None,
    weighting: str = "uniform",
    depth_range: tuple[float, float] | None = None,
) -> CorrespondenceTargets:
    """Soft band of key tokens within `band` tokens of the query centre's epipolar segment (soft only).

    band 0.75 > sqrt(2)/2 guarantees that the token holding the true correspondence is in the band
    (its centre is at most half a token diagonal from the true point, which lies on the line).
    k (default 2 max(h, w), enough for a band of that width across the grid) caps the tokens kept;
    a query whose band holds more keeps the k nearest to the line.
    weighting: `uniform`, or `gaussian` in the distance to the line (sigma = band / 2).
    depth_range (d_min, d_max) clips the line to the scene's depth bounds when they are known.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown epipolar weighting {weighting!r}; valid: {list(WEIGHTINGS)}")
    V, h, w = grid
    K, c2w = batch["intrinsics"], batch["cam2world"]
    B, T = K.shape[0], h * w
    k = 2 * max(h, w) if k is None else min(k, T)
    d_min, d_max = (0.0, float("inf")) if depth_range is None else depth_range
    vi, vj = view_pairs(V, K.device)
    centres = token_centres(h, w, stride, torch.float64, K.device)  # [T, 2]
    p0, p1, ok = ray_segments(
        K[:, vi], relative_pose(c2w[:, vi], c2w[:, vj]), K[:, vj], centres, d_min, d_max
    )  # [B, P, T, 2] x2, [B, P, T]

    margin = (band + 1) * stride
    p0, p1, ok_box = clip_segments(p0, p1, -0.5 - margin, max(h, w) * stride - 0.5 + margin)
    ok = ok & ok_box
    to_tokens = lambda p: ((p + 0.5) / stride - 0.5).flatten(0, 1)  # noqa: E731  [M, T, 2] float64
    gaussian = weighting == "gaussian"
    idx, dist, in_band = band_tokens(to_tokens(p0), to_tokens(p1), band, k, h, w, with_distance=gaussian)
    idx, in_band = idx.reshape(B, -1, T, k), in_band.reshape(B, -1, T, k)
    weight = in_band.float()
    if gaussian:
        weight = torch.exp(-0.5 * (dist.reshape(B, -1, T, k) / (band / 2)) ** 2) * in_band
    valid = ok & in_band.any(-1)
    weight = (weight / weight.sum(-1, keepdim=True).clamp(min=1e-12)).float()
    return assemble(idx, weight, valid, grid, vi, vj)
