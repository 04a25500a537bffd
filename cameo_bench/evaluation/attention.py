"""Attention correspondence per layer: does each query token's attention peak at its true location in the other views?

Measured on EVERY attention layer, not only the supervised one, so that emergent correspondence can
be profiled. The attention scored is the quantity CAMEO's per-view loss supervises (head-mean logits,
softmax over the keys of each key view: `key_view_attention`, also what the figures draw). The truth
is dense where the batch has depth: the depth reprojection of each query token's centre pixel.
Without depth it is sparse: SfM tracks (`track_ids`/`track_uv`: the same 3D point observed in two
views) or SIFT matches of the batch images, verified against the known poses; each pixel pair gives
one query (the token holding the point in view i) and its truth (the point's position in view j, in
tokens). Sparse metrics carry their source in the name (`attn/<layer>/sfm_tracks/pck@1`) because they
score other queries than dense depth does (textured, SfM-visible points; up to half a token of
query-position offset, since the point need not sit at its token's centre).
Scores are pooled over batches as per-query arrays (`epe`, `mass`, `angle`) and summarised per
layer, truth and viewpoint bin.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, NamedTuple

import torch
from einops import rearrange

from backbones import TapRequest
from cameo_bench import geometry
from cameo_bench.evaluation.metrics import view_bins
from cameo_bench.tracking import keys

PCK_THRESHOLDS = (0.5, 1.0, 2.0)  # tokens
SCORES = ("epe", "mass", "angle")  # per-query arrays every source of truth produces


def key_view_logits(q: torch.Tensor, k: torch.Tensor, scale: float, num_views: int) -> torch.Tensor:
    """Head-mean attention logits of each query against the keys of each view, one block per key view.

    q [..., H, Q, d], k [..., H, V*n, d] (view-major) -> [..., Q, V, n]. The mean over heads is what
    CAMEO's `mean` head supervises, so the metric reads the attention the loss shapes.
    """
    if k.shape[-2] % num_views:
        raise ValueError(f"k has {k.shape[-2]} tokens, not a multiple of num_views={num_views}")
    views = k.float().unflatten(-2, (num_views, -1))  # [..., H, V, n, d]
    logits = [torch.einsum("...hqd,...hkd->...qk", q.float(), views[..., j, :, :]) * scale / q.shape[-3]
              for j in range(num_views)]  # V x [..., Q, n]
    return torch.stack(logits, -2)  # [..., Q, V, n]


def key_view_attention(q: torch.Tensor, k: torch.Tensor, scale: float, grid: tuple[int, int, int]) -> torch.Tensor:
    """Attention of each query over each key view: head-mean logits, softmax over the keys of each
    view separately (the quantity CAMEO's per-view loss and the PCK metric use).

    q [..., H, Q, d], k [..., H, N, d] with N = V*h*w (view-major) -> [..., Q, V, h, w]; each [q, v]
    sums to 1.
    """
    V, h, w = grid
    if k.shape[-2] != V * h * w:
        raise ValueError(f"k has {k.shape[-2]} tokens, grid {grid} needs {V * h * w}")
    probs = key_view_logits(q, k, scale, V).softmax(-1)  # [..., Q, V, h*w]
    return rearrange(probs, "... q v (y x) -> ... q v y x", y=h, x=w)


def real_cameras(diffusion):
    """The same objective without classifier-free camera dropout: attention is measured with the
    cameras the model is given at inference, never with a dropped ("no camera") input."""
    return type(diffusion)(dataclasses.replace(diffusion.config, camera_dropout=0.0), codec=diffusion.codec)


def layer_tap(model, diffusion, batch: dict, layer: str, *, timestep: int, seed: int):
    """The tap of `layer` in one noised forward pass at noise level `timestep` (noise from `seed`)."""
    t = torch.full((batch["image"].shape[0],), timestep, dtype=torch.long)  # [B]
    _, aux = diffusion.training_loss(model, batch, t=t, generator=torch.Generator().manual_seed(seed),
                                     tap=TapRequest(layer))
    return aux["tap"]


def token_ground_truth(batch: dict, grid: tuple[int, int, int], stride: int):
    """Continuous token coordinates in view j of each query token's centre pixel in view i.

    Returns xy [B, V, V, h*w, 2] (x, y in tokens of view j), valid [B, V, V, h*w] (never on i == j),
    and the relative rotation angle [B, V, V] in degrees.
    """
    V, h, w = grid
    depth, K, c2w = batch["depth"], batch["intrinsics"], batch["cam2world"]
    B = depth.shape[0]
    # the exact token centre ((a + 1/2) s - 1/2) falls between pixels for even strides: average
    # the landing points of the 1 or 2 x 2 pixels around it, valid only if all of them are valid
    offsets = sorted({(stride - 1) // 2, stride // 2})
    rows = [torch.arange(h, device=depth.device) * stride + o for o in offsets]
    cols = [torch.arange(w, device=depth.device) * stride + o for o in offsets]
    xy = depth.new_zeros(B, V, V, h * w, 2)
    valid = torch.zeros(B, V, V, h * w, dtype=torch.bool, device=depth.device)
    for i in range(V):
        for j in range(V):
            if i == j:
                continue
            uv, ok = geometry.reproject(depth[:, i], K[:, i], c2w[:, i], K[:, j], c2w[:, j], depth[:, j])
            uv_c = sum(uv[:, r][:, :, c] for r in rows for c in cols) / (len(rows) * len(cols))  # [B, h, w, 2]
            ok_c = torch.stack([ok[:, r][:, :, c] for r in rows for c in cols]).all(0)  # [B, h, w]
            xy[:, i, j] = rearrange((uv_c + 0.5) / stride - 0.5, "b h w c -> b (h w) c")
            valid[:, i, j] = rearrange(ok_c, "b h w -> b (h w)")
    angle = geometry.rotation_angle_deg(c2w[:, :, None], c2w[:, None, :])  # [B, V, V]
    return xy, valid, angle


def attention_scores(tap, grid: tuple[int, int, int], gt_xy, gt_valid, angle) -> dict[str, torch.Tensor]:
    """Per (scene, query view, key view, valid query): argmax end-point error `epe` in tokens, the
    attention `mass` within one token of the truth, and the pair's viewpoint change `angle`.

    gt_xy [B, V, V, h*w, 2], gt_valid [B, V, V, h*w], angle [B, V, V] as `token_ground_truth` gives them.
    """
    V, h, w = grid
    n = h * w
    key_xy = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(h), indexing="xy"), -1)
    key_xy = key_xy.reshape(n, 2).to(gt_xy)  # [hw, 2] (x, y)
    epe, mass, bins = [], [], []
    for i in range(V):
        logits = key_view_logits(tap.q[:, :, i * n:(i + 1) * n], tap.k, tap.scale, V)  # [B, n, V, n]
        probs = logits.softmax(-1)  # [B, n, V, n]
        for j in range(V):
            if i == j:
                continue
            pred = key_xy[logits[:, :, j].argmax(-1)]  # [B, n, 2]
            target = gt_xy[:, i, j]  # [B, n, 2]
            dist = (key_xy[None, None] - target[:, :, None]).norm(dim=-1)  # [B, n, hw]
            ok = gt_valid[:, i, j]  # [B, n]
            epe.append((pred - target).norm(dim=-1)[ok])
            mass.append((probs[:, :, j] * (dist <= 1.0)).sum(-1)[ok])
            bins.append(angle[:, i, j, None].expand(-1, n)[ok])
    return {"epe": torch.cat(epe), "mass": torch.cat(mass), "angle": torch.cat(bins)}


class PixelPairs(NamedTuple):
    """Sparse truth in pixels: point s is at uv_i[s] in view i[s] and at uv_j[s] in view j[s] of batch
    element b[s] (all [S]; uv [S, 2], integer-centre convention). Both directions are listed."""

    b: torch.Tensor
    i: torch.Tensor
    j: torch.Tensor
    uv_i: torch.Tensor
    uv_j: torch.Tensor


def _in_image(uv: torch.Tensor, H: int, W: int) -> torch.Tensor:  # [S] bool
    return (uv[:, 0] >= -0.5) & (uv[:, 0] < W - 0.5) & (uv[:, 1] >= -0.5) & (uv[:, 1] < H - 0.5)


def track_pairs(batch: dict) -> PixelPairs:
    """Every ordered view pair's co-observed SfM points: ids present (>= 0) in both views' `track_ids`
    [B, V, M], at their `track_uv` [B, V, M, 2]; observations outside the image are dropped."""
    ids, uv = batch["track_ids"].cpu(), batch["track_uv"].cpu().double()
    B, V, _ = ids.shape
    H, W = batch["image"].shape[-2:]
    parts = []
    for b in range(B):
        for i in range(V):
            for j in range(V):
                if i == j:
                    continue
                same = (ids[b, i, :, None] == ids[b, j, None, :]) & (ids[b, i, :, None] >= 0)  # [M, M]
                mi, mj = same.nonzero(as_tuple=True)
                ok = _in_image(uv[b, i, mi], H, W) & _in_image(uv[b, j, mj], H, W)
                mi, mj = mi[ok], mj[ok]
                n = len(mi)
                parts.append((torch.full((n,), b), torch.full((n,), i), torch.full((n,), j), uv[b, i, mi], uv[b, j, mj]))
    return PixelPairs(*(torch.cat(column) for column in zip(*parts)))


def match_pairs(batch: dict, *, max_sampson: float = 1.0, seed: int = 0) -> PixelPairs:
    """SIFT matches of every view pair (the `matches` source's detector, ratio and mutual tests and
    RANSAC), kept only within `max_sampson` pixels (of the model image) of the epipolar geometry of
    the batch's cameras: a match that contradicts the known poses is no truth. SIFT runs on
    `match_image` when the batch has it (the same crop at a larger size: gin data.match_image_size),
    and the matches are mapped to model-image pixels."""
    from cameo_bench.correspondence import matches as sift

    import cv2

    source = batch.get("match_image", batch["image"])
    H, W = batch["image"].shape[-2:]
    sy, sx = source.shape[-2] / H, source.shape[-1] / W  # source pixels per model pixel
    to_source = torch.tensor([[sx, 0, 0.5 * (sx - 1)], [0, sy, 0.5 * (sy - 1)], [0, 0, 1.0]], dtype=torch.float64)
    gray = sift._gray_uint8(source)  # [B, V, h, w]
    B, V = gray.shape[:2]
    K, c2w = to_source @ batch["intrinsics"].cpu().double(), batch["cam2world"].cpu().double()
    cv2.setRNGSeed(seed)
    parts = []
    for b in range(B):
        features = [sift.detect(gray[b, v]) for v in range(V)]
        for a in range(V):
            for c in range(a + 1, V):
                F_ac = sift.fundamental_from_poses(K[b, a], c2w[b, a], K[b, c], c2w[b, c])
                pa, pc, _ = sift.verified_matches(features[a], features[c], F_ab=F_ac,
                                                  max_sampson=max_sampson * max(sx, sy))
                scale = torch.tensor([sx, sy], dtype=torch.float64)
                pa, pc = ((torch.from_numpy(p).double() + 0.5) / scale - 0.5 for p in (pa, pc))  # model pixels
                n = len(pa)
                parts.append((torch.full((n,), b), torch.full((n,), a), torch.full((n,), c), pa, pc))
                parts.append((torch.full((n,), b), torch.full((n,), c), torch.full((n,), a), pc, pa))
    if not parts:
        empty = torch.zeros(0, dtype=torch.long)
        return PixelPairs(empty, empty, empty, torch.zeros(0, 2, dtype=torch.float64), torch.zeros(0, 2, dtype=torch.float64))
    return PixelPairs(*(torch.cat(column) for column in zip(*parts)))


def sparse_attention_scores(tap, grid: tuple[int, int, int], stride: int, pairs: PixelPairs,
                            angle: torch.Tensor) -> dict[str, torch.Tensor]:
    """`epe`, `mass`, `angle` [S] of sparse pixel pairs, as `attention_scores` gives them for dense
    truth: the query is the token of view i holding uv_i, the truth uv_j in view j's continuous token
    coordinates ((u + 1/2) / stride - 1/2); angle [B, V, V] is the pairs' viewpoint change."""
    V, h, w = grid
    n = h * w
    key_xy = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(h), indexing="xy"), -1).reshape(n, 2).double()
    col = torch.floor((pairs.uv_i[:, 0] + 0.5) / stride).clamp(0, w - 1)
    row = torch.floor((pairs.uv_i[:, 1] + 0.5) / stride).clamp(0, h - 1)
    query = (row * w + col).long()  # [S] token of view i
    target = (pairs.uv_j + 0.5) / stride - 0.5  # [S, 2] tokens of view j
    epe = torch.zeros(len(query), dtype=torch.float64)
    mass = torch.zeros(len(query), dtype=torch.float64)
    groups = torch.stack([pairs.b, pairs.i, pairs.j], 1)  # [S, 3]
    for b, i, j in torch.unique(groups, dim=0).tolist():
        sel = ((groups[:, 0] == b) & (groups[:, 1] == i) & (groups[:, 2] == j)).nonzero(as_tuple=True)[0]
        q = tap.q[b, :, i * n + query[sel].to(tap.q.device)].float()  # [H, s, d]
        k = tap.k[b, :, j * n:(j + 1) * n].float()  # [H, n, d]
        logits = (torch.einsum("hqd,hkd->qk", q, k) * tap.scale / q.shape[0]).double().cpu()  # [s, n] head mean
        probs = logits.softmax(-1)
        dist = (key_xy[None] - target[sel, None]).norm(dim=-1)  # [s, n]
        epe[sel] = (key_xy[logits.argmax(-1)] - target[sel]).norm(dim=-1)
        mass[sel] = (probs * (dist <= 1.0)).sum(-1)
    return {"epe": epe.float(), "mass": mass.float(), "angle": angle.cpu()[pairs.b, pairs.i, pairs.j].float()}


def summarise_attention(scores: dict[str, torch.Tensor], layer: str, truth: str | None = None) -> dict[str, float]:
    """`attn/<layer>/{epe, mass1, pck@t, pck@1/<bin>, count/<bin>}` over per-query scores, with the
    sparse truth's name inserted (`attn/<layer>/sfm_tracks/pck@1`) when `truth` is given; empty when
    no query had a valid truth (a mean over nothing is not a metric)."""
    out: dict[str, float] = {}
    epe, mass, angle = scores["epe"], scores["mass"], scores["angle"]
    if epe.numel() == 0:
        return out

    def name(metric: str) -> str:
        return keys.attn(layer, metric if truth is None else keys.attn_truth(truth, metric))

    out[name(keys.EPE)] = float(epe.mean())
    out[name(keys.MASS1)] = float(mass.mean())
    for t in PCK_THRESHOLDS:
        out[name(keys.pck(t))] = float((epe <= t).float().mean())
    for bin_name, sel in view_bins(angle):
        out[name(keys.in_bin(keys.PCK1, bin_name))] = float((epe[sel] <= 1.0).float().mean())
        out[name(keys.in_bin(keys.COUNT, bin_name))] = float(sel.sum())
    return out


def supervised_copy(metrics: dict[str, float], layer: str) -> dict[str, float]:
    """The supervised layer's attention metrics again under `attn/supervised/`: runs that supervise
    different layers then share one column in reports."""
    prefix = keys.attn_prefix(layer)
    return {keys.SUPERVISED_PREFIX + k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}


def batch_truth(batch: dict, truth: str = "depth") -> str | None:
    """Which truth scores this batch: `truth` itself if the batch has it, for 'auto' the first of
    depth, sfm_tracks (track_ids + track_uv), matches (SIFT on the images; needs cameras), else None."""
    has = {"depth": "depth" in batch,
           keys.TRUTH_TRACKS: {"track_ids", "track_uv"} <= set(batch),
           keys.TRUTH_MATCHES: {"intrinsics", "cam2world"} <= set(batch)}
    if truth != "auto":
        return truth if has[truth] else None
    return next((name for name in ("depth", keys.TRUTH_TRACKS, keys.TRUTH_MATCHES) if has[name]), None)


@torch.no_grad()
def attention_metrics(model, diffusion, batches: list[dict], *, timestep: int, seed: int,
                      layers: Iterable[str] | None = None, truth: str = "depth",
                      omitted: dict[str, str] | None = None) -> dict[str, float]:
    """Attention-correspondence metrics of each attention layer at one noise level.

    Every batch with a truth (`batch_truth`: dense depth, or with `truth` = 'sfm_tracks', 'matches'
    or 'auto' the sparse ones) is scored; one without is skipped, never the batches already scored.
    Batch b's noise comes from `seed * 31 + b` whichever batches are skipped. When nothing could be
    scored and `omitted` is given, it gets `omitted[attn/] = why`.
    """
    layer_specs = {layer.name: layer for layer in model.attention_layers()}
    names = list(layers) if layers is not None else list(layer_specs)
    collected: dict[tuple[str, str], list[dict[str, torch.Tensor]]] = {}
    plain = real_cameras(diffusion)
    for b, batch in enumerate(batches):
        kind = batch_truth(batch, truth)
        if kind is None:
            continue
        _, V, _, H, W = batch["image"].shape
        truth_at = {}  # stride -> token ground truth: layers at one stride share it
        pairs = None
        if kind != "depth":
            pairs = track_pairs(batch) if kind == keys.TRUTH_TRACKS else match_pairs(batch, seed=seed)
            angle = geometry.rotation_angle_deg(batch["cam2world"][:, :, None], batch["cam2world"][:, None, :])
            if len(pairs.b) == 0:
                continue
        for name in names:
            stride = layer_specs[name].stride * diffusion.codec.downsample  # in image pixels (latents: x8)
            grid = (V, H // stride, W // stride)
            tap = layer_tap(model, plain, batch, name, timestep=timestep, seed=seed * 31 + b)
            if kind == "depth":
                if stride not in truth_at:
                    truth_at[stride] = token_ground_truth(batch, grid, stride)
                scores = attention_scores(tap, grid, *truth_at[stride])
            else:
                scores = sparse_attention_scores(tap, grid, stride, pairs, angle)
            collected.setdefault((name, kind), []).append({key: value.cpu() for key, value in scores.items()})
    out: dict[str, float] = {}
    for (name, kind), parts in collected.items():
        scores = {key: torch.cat([p[key] for p in parts]) for key in SCORES}
        out.update(summarise_attention(scores, name, None if kind == "depth" else kind))
    if not out and omitted is not None:
        wanted = "depth, SfM tracks (track_ids, track_uv) or SIFT matches" if truth == "auto" else truth
        omitted[keys.ATTN] = f"no evaluation batch has a correspondence truth (eval.attention_truth = {truth!r}: {wanted})"
    return out
