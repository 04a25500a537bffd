"""Pixel-to-token helpers every source shares: pooling, and the per-pair -> [B, N, V, k] layout.

Token (a, b) of a layer with pixel stride s covers pixels [a s, (a+1) s) x [b s, (b+1) s). A pixel
position u (integer-centre convention, pixel x covers [x - 1/2, x + 1/2)) lies in token column
floor((u + 1/2) / s), which is round(x_t) of the continuous token coordinate x_t = (u + 1/2)/s - 1/2.

Sources compute per ordered view pair (i, j), i != j, with the pairs flattened into one batch
dimension P = V (V - 1) so that every pair goes through one vectorised call; `assemble` scatters
the per-pair results into the [B, N, V, k] layout of `CorrespondenceTargets`.
"""
from __future__ import annotations

import torch
from einops import rearrange

from cameo_bench.correspondence.targets import CorrespondenceTargets


def view_pairs(num_views: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """All ordered pairs (i, j) with i != j, query-view major: (vi [P], vj [P])."""
    vi, vj = torch.meshgrid(torch.arange(num_views), torch.arange(num_views), indexing="ij")
    keep = vi != vj
    return vi[keep].to(device), vj[keep].to(device)


def centre_offset(stride: int) -> int:
    """Index inside a token of the pixel holding the token centre (b + 1/2) s - 1/2.

    For odd s that pixel is centred on it; for even s the centre lies on the corner of four pixels
    and this is the lower-right one, whose footprint [x - 1/2, x + 1/2) contains it.
    """
    return stride // 2


def subsample_intrinsics(K: torch.Tensor, stride: int, offset: int) -> torch.Tensor:  # [..., 3, 3]
    """Intrinsics of the image made of pixels (offset + s b, offset + s a): index b of the
    sub-image is pixel u = s b + offset of the full image, so u' = (u - offset) / s."""
    A = torch.tensor(
        [[1.0 / stride, 0.0, -offset / stride], [0.0, 1.0 / stride, -offset / stride], [0.0, 0.0, 1.0]],
        dtype=K.dtype,
        device=K.device,
    )
    return A @ K


def token_centres(h: int, w: int, stride: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """[h*w, 2] (u, v) pixel positions of the token centres, ((b + 1/2) s - 1/2, (a + 1/2) s - 1/2)."""
    a, b = torch.meshgrid(
        torch.arange(h, dtype=dtype, device=device), torch.arange(w, dtype=dtype, device=device), indexing="ij"
    )
    uv = torch.stack([(b + 0.5) * stride - 0.5, (a + 0.5) * stride - 0.5], dim=-1)  # [h, w, 2]
    return uv.reshape(h * w, 2)


def pixel_to_token(uv: torch.Tensor, stride: int, h: int, w: int) -> torch.Tensor:  # [...] long
    """Token index (row-major within the view) of the pixel footprint containing uv [..., 2].

    Positions outside the image go to the nearest border token (NaN to token 0). The arithmetic
    stays in floating point, exact for any grid below 2^24 tokens, with one conversion at the
    end: int64 tensor ops cost several times more than float ones on CPU.
    """
    col = torch.nan_to_num(torch.floor((uv[..., 0] + 0.5) / stride), nan=0.0).clamp(0, w - 1)
    row = torch.nan_to_num(torch.floor((uv[..., 1] + 0.5) / stride), nan=0.0).clamp(0, h - 1)
    return (row * w + col).long()


def token_xy(idx: torch.Tensor, w: int) -> torch.Tensor:  # [..., 2] float (col, row)
    return torch.stack([idx % w, idx // w], dim=-1).float()


def group_patches(x: torch.Tensor, stride: int) -> torch.Tensor:
    """[..., H, W] -> [..., h*w, s*s]: the pixels of each token, token-major."""
    return rearrange(x, "... (h s1) (w s2) -> ... (h w) (s1 s2)", s1=stride, s2=stride)


def histogram_topk(
    tokens: torch.Tensor, valid: torch.Tensor, k: int, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of the histogram of where a patch's pixels land.

    tokens/valid [M, P]: target token of each of the P pixels of M patches. Returns idx [M, k],
    counts [M, k] (float; 0 for unused slots, whose idx is 0) and num_valid [M]. Ties go to the
    lower token id so that the result does not depend on the sort implementation.
    Cost O(M P log P): a sort per patch instead of an [M, num_tokens] histogram, which would not
    fit at paper scale (73k patches x 1024 tokens).
    """
    M, P = tokens.shape
    key = torch.where(valid, tokens, torch.full_like(tokens, num_tokens))  # invalid -> sentinel
    key, _ = key.sort(dim=-1)  # [M, P]
    starts = torch.ones_like(key, dtype=torch.bool)
    starts[:, 1:] = key[:, 1:] != key[:, :-1]
    run = starts.long().cumsum(-1) - 1  # [M, P] run id (runs are in increasing token order)
    counts = torch.zeros(M, P, dtype=torch.long, device=key.device)
    counts.scatter_add_(1, run, (key < num_tokens).long())
    values = torch.zeros(M, P, dtype=torch.long, device=key.device)
    values.scatter_(1, run, key)  # every writer of a run writes the same value
    run_pos = torch.arange(P, device=key.device).expand(M, P)
    score = counts * (P + 1) - run_pos  # count first, then the lower token id
    kk = min(k, P)
    top = score.topk(kk, dim=-1).indices  # [M, kk]
    idx = values.gather(1, top)
    cnt = counts.gather(1, top).to(torch.float32)
    idx = torch.where(cnt > 0, idx, torch.zeros_like(idx))
    if kk < k:  # more slots than pixels: pad with empty slots
        idx = torch.cat([idx, idx.new_zeros(M, k - kk)], dim=1)
        cnt = torch.cat([cnt, cnt.new_zeros(M, k - kk)], dim=1)
    return idx, cnt, valid.sum(-1)


def assemble(
    idx: torch.Tensor,
    weight: torch.Tensor,
    valid: torch.Tensor,
    grid: tuple[int, int, int],
    vi: torch.Tensor,
    vj: torch.Tensor,
    cost: torch.Tensor | None = None,
) -> CorrespondenceTargets:
    """Per-pair results idx/weight [B, P, h*w, k], valid [B, P, h*w] (and optionally the match
    distance cost [B, P, h*w]) -> CorrespondenceTargets.

    Own-view entries (j = i) stay invalid with idx 0 and weight 0 (cost inf); so do invalid
    pairs, whatever the source left in them, so consumers may gather without masking first.
    The cost is kept as given on invalid pairs: it may rank views the mask drops.
    """
    V, h, w = grid
    B, P, T, k = idx.shape
    valid = valid.bool()
    idx = torch.where(valid[..., None], idx, torch.zeros_like(idx))
    weight = torch.where(valid[..., None], weight, torch.zeros_like(weight))
    out_idx = idx.new_zeros(V, V, B, T, k)
    out_w = weight.new_zeros(V, V, B, T, k)
    out_valid = valid.new_zeros(V, V, B, T)
    out_idx[vi, vj] = rearrange(idx, "b p t k -> p b t k")
    out_w[vi, vj] = rearrange(weight, "b p t k -> p b t k")
    out_valid[vi, vj] = rearrange(valid, "b p t -> p b t")
    out_cost = None
    if cost is not None:
        out_cost = cost.new_full((V, V, B, T), float("inf"))
        out_cost[vi, vj] = rearrange(cost, "b p t -> p b t")
    pair_major = "vi vj b t"  # the scatter above indexes (query view, key view) first
    return _pack(out_idx, out_w, out_valid, out_cost, grid, pair_major)


def _pack(idx, weight, valid, cost, grid, layout: str) -> CorrespondenceTargets:
    """Per-pair tensors laid out as `layout` (plus a trailing k on idx/weight) -> the view-major
    CorrespondenceTargets layout [B, (V h w), V(, k)]."""
    to_targets = f"{layout} -> b (vi t) vj"
    return CorrespondenceTargets(
        idx=rearrange(idx, f"{layout} k -> b (vi t) vj k"),
        weight=rearrange(weight, f"{layout} k -> b (vi t) vj k"),
        valid=rearrange(valid, to_targets),
        grid=tuple(grid),
        cost=None if cost is None else rearrange(cost, to_targets),
    )


def assemble_all_pairs(
    idx: torch.Tensor,
    valid: torch.Tensor,
    grid: tuple[int, int, int],
    weight: torch.Tensor | None = None,
    cost: torch.Tensor | None = None,
) -> CorrespondenceTargets:
    """Results for all V x V ordered pairs, query view on dim 1 and key view on dim 2 (what
    broadcasting cameras [B, V, 1] against [B, 1, V] gives): idx [B, V, V, h*w, k], valid
    [B, V, V, h*w], weight like idx or None for one-hot (1 where valid), cost like valid or None
    (set to inf on the own view) -> CorrespondenceTargets.

    Same result as `assemble` on the V (V - 1) pairs with i != j: own-view and invalid entries
    get idx 0 and weight 0. It skips the per-pair scatter, which costs more than the work it
    saves when a source can compute the V own-view pairs along with the rest.
    """
    V, h, w = grid
    off_diagonal = ~torch.eye(V, dtype=torch.bool, device=valid.device)[:, :, None]  # [V, V, 1]
    valid = valid.bool() & off_diagonal  # [B, V, V, T]
    if weight is None:
        weight = valid[..., None].float()
    else:
        weight = torch.where(valid[..., None], weight, torch.zeros_like(weight))
    idx = idx * valid[..., None]  # integer: exact, and cheaper than `where`
    if cost is not None:
        cost = cost.masked_fill(~off_diagonal, float("inf"))
    return _pack(idx, weight, valid, cost, grid, "b vi vj t")


def empty_targets(batch_size: int, grid: tuple[int, int, int], k: int = 1, device=None) -> CorrespondenceTargets:
    """All-invalid targets (a source that found nothing for a whole batch)."""
    V, h, w = grid
    N = V * h * w
    return CorrespondenceTargets(
        idx=torch.zeros(batch_size, N, V, k, dtype=torch.long, device=device),
        weight=torch.zeros(batch_size, N, V, k, device=device),
        valid=torch.zeros(batch_size, N, V, dtype=torch.bool, device=device),
        grid=(V, h, w),
    )
