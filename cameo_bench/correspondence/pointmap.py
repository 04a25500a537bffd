"""`pointmap_nn`: the official CAMEO target source (nearest token in 3D + cycle check).

Released CAMEO code: world point maps are bilinearly resized to the token grid, the target of query
q in key view j is argmin_k ||X_q - X_k||, and the pair is kept when the round trip
q -> k* -> q' (nearest neighbour back in view i) lands within tau tokens of q. There is no
occlusion test, so at large viewpoint changes many kept pairs are not co-visible (notes/data.md
2a.7); the optional 3D gate (`gate`, in token footprints z s / f) removes most of them.
The targets' `cost` is that nearest distance min_k ||X_q - X_k|| (world units, same distance
matrix), before the cycle check and the gate: the released `onehot_global` target ranks key views
by it whether or not their pair survives the check.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from cameo_bench.correspondence.registry import register_source
from cameo_bench.correspondence.targets import CorrespondenceTargets
from cameo_bench.correspondence.tokens import assemble, token_xy, view_pairs
from cameo_bench.geometry import invert_rigid, unproject

# Bound on the elements of one chunk of pairwise distance matrices (float32: 64 MiB).
_MAX_CHUNK_ELEMENTS = 1 << 24


def _world_points(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """World points [B, V, 3, H, W] and their validity [B, V, H, W], from `point_map` if present,
    else from depth and cameras."""
    if "point_map" in batch:
        points = batch["point_map"]
        valid = torch.isfinite(points).all(dim=2)
        if "depth" in batch:  # a depth map marks missing geometry more reliably than zeros
            d = batch["depth"]
            valid = valid & torch.isfinite(d) & (d > 0)
        return points, valid
    depth = batch["depth"]
    points = rearrange(unproject(depth, batch["intrinsics"], batch["cam2world"]), "b v h w c -> b v c h w")
    valid = torch.isfinite(depth) & (depth > 0)
    return points, valid


def token_points(points: torch.Tensor, valid: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear resize (as CAMEO) of [B, V, 3, H, W] points to the token grid -> [B, V, h*w, 3], and
    token validity [B, V, h*w]: a token is valid only if every pixel the resize mixed was valid."""
    B, V = points.shape[:2]
    clean = torch.where(valid[:, :, None], points, torch.zeros_like(points))
    pts = F.interpolate(clean.flatten(0, 1), size=(h, w), mode="bilinear", align_corners=False)
    ok = F.interpolate(valid.flatten(0, 1)[:, None].to(points.dtype), size=(h, w), mode="bilinear", align_corners=False)
    pts = rearrange(pts, "(b v) c h w -> b v (h w) c", b=B, v=V)
    ok = rearrange(ok, "(b v) 1 h w -> b v (h w)", b=B, v=V) > 1 - 1e-6
    return pts, ok


def nearest_tokens(
    X_a: torch.Tensor, ok_a: torch.Tensor, X_b: torch.Tensor, ok_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest valid token both ways between two sets of token points [..., T, 3].

    Returns (nn_ab [..., T] index into b, dist_ab [..., T], nn_ba, dist_ba). One distance matrix
    serves both directions: ||X_q - X_k|| is symmetric. Rows with no valid partner get dist inf.
    """
    lead = X_a.shape[:-2]
    T = X_a.shape[-2]
    Xa, Xb = X_a.reshape(-1, T, 3), X_b.reshape(-1, X_b.shape[-2], 3)
    oka, okb = ok_a.reshape(-1, T), ok_b.reshape(-1, X_b.shape[-2])
    M = Xa.shape[0]
    chunk = max(1, _MAX_CHUNK_ELEMENTS // (T * Xb.shape[1]))
    outs = []
    for s in range(0, M, chunk):
        d = torch.cdist(Xa[s : s + chunk], Xb[s : s + chunk])  # [m, Ta, Tb]
        d.masked_fill_(~oka[s : s + chunk, :, None], float("inf"))  # broadcast masks: no [m, Ta, Tb] mask
        d.masked_fill_(~okb[s : s + chunk, None, :], float("inf"))
        dist_ab, nn_ab = d.min(dim=2)
        dist_ba, nn_ba = d.min(dim=1)
        outs.append((nn_ab, dist_ab, nn_ba, dist_ba))
    return tuple(torch.cat(parts).reshape(*lead, -1) for parts in zip(*outs))


@register_source("pointmap_nn", requires=(("point_map",), ("depth", "intrinsics", "cam2world")))
def pointmap_source(
    batch,
    grid,
    stride,
    *,
    cycle: bool = True,
    tau: float = 1.5,
    gate: float | None = None,
) -> CorrespondenceTargets:
    """Nearest token in 3D over point maps resized to the grid, cycle check within tau tokens (CAMEO).

    `cost` is the distance to that nearest token (inf where the query token or the whole key
    view has no valid point). `cycle=False` keeps every query with a valid nearest neighbour (the "no cycle check" ablation).
    `gate`: keep only pairs whose nearest 3D distance is below `gate` token footprints
    (z_q * stride / f_x of the query view); needs intrinsics and cam2world.
    """
    V, h, w = grid
    points, valid_px = _world_points(batch)
    if not points.is_floating_point():
        points = points.float()
    X, ok = token_points(points, valid_px, h, w)  # [B, V, T, 3], [B, V, T]

    # Each unordered pair once; both directions come from the same distance matrix.
    ua, ub = torch.triu_indices(V, V, offset=1, device=X.device)
    nn_ab, d_ab, nn_ba, d_ba = nearest_tokens(X[:, ua], ok[:, ua], X[:, ub], ok[:, ub])  # [B, U, T]
    vi, vj = view_pairs(V, X.device)
    # Ordered pair (i, j) -> its unordered pair u and whether (i, j) runs a -> b.
    u_of = torch.full((V, V), -1, dtype=torch.long, device=X.device)
    u_of[ua, ub] = torch.arange(ua.numel(), device=X.device)
    u_of[ub, ua] = torch.arange(ua.numel(), device=X.device)
    forward = (vi < vj)[None, :, None]  # [1, P, 1]
    u = u_of[vi, vj]
    nn_ij = torch.where(forward, nn_ab[:, u], nn_ba[:, u])  # [B, P, T] target token in j
    d_ij = torch.where(forward, d_ab[:, u], d_ba[:, u])
    nn_ji = torch.where(forward, nn_ba[:, u], nn_ab[:, u])  # [B, P, T] back from j to i

    valid = ok[:, vi] & torch.isfinite(d_ij)  # [B, P, T]
    if cycle:
        back = torch.gather(nn_ji, 2, nn_ij)  # q' = nn_ji[nn_ij[q]]
        q = torch.arange(h * w, device=X.device).expand_as(back)
        valid = valid & ((token_xy(back, w) - token_xy(q, w)).norm(dim=-1) < tau)
    if gate is not None:
        missing = [key for key in ("intrinsics", "cam2world") if key not in batch]
        if missing:
            raise KeyError(f"pointmap_nn with gate={gate} needs batch keys {missing} for the token footprint")
        w2c = invert_rigid(batch["cam2world"].to(X.dtype))[:, vi]  # [B, P, 4, 4]
        z = torch.einsum("bpc,bptc->bpt", w2c[:, :, 2, :3], X[:, vi]) + w2c[:, :, 2, 3, None]
        fx = batch["intrinsics"].to(X.dtype)[:, vi, 0, 0]  # [B, P]
        footprint = z.abs() * stride / fx[..., None]
        valid = valid & (d_ij < gate * footprint)

    idx = nn_ij[..., None]  # [B, P, T, 1]
    return assemble(idx, valid[..., None].float(), valid, grid, vi, vj, cost=d_ij)
