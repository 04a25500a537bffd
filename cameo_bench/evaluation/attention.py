"""Attention correspondence per layer: does each query token's attention peak at its true location in the other views?

Measured on EVERY attention layer, not only the supervised one, so that emergent correspondence can
be profiled. The attention scored is the quantity CAMEO's per-view loss supervises (head-mean logits,
softmax over the keys of each key view: `key_view_attention`, also what the figures draw). The truth
is dense: the depth reprojection of each query token's centre pixel. Scores are pooled over batches
as per-query arrays (`epe`, `mass`, `angle`) and summarised per layer and viewpoint bin, so another
source of truth (sparse tracks or matches, for batches without depth) only has to produce the same
per-query arrays.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

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


def summarise_attention(scores: dict[str, torch.Tensor], layer: str) -> dict[str, float]:
    """`attn/<layer>/{epe, mass1, pck@t, pck@1/<bin>, count/<bin>}` over per-query scores; empty
    when no query had a valid truth (a mean over nothing is not a metric)."""
    out: dict[str, float] = {}
    epe, mass, angle = scores["epe"], scores["mass"], scores["angle"]
    if epe.numel() == 0:
        return out
    out[keys.attn(layer, keys.EPE)] = float(epe.mean())
    out[keys.attn(layer, keys.MASS1)] = float(mass.mean())
    for t in PCK_THRESHOLDS:
        out[keys.attn(layer, keys.pck(t))] = float((epe <= t).float().mean())
    for name, sel in view_bins(angle):
        out[keys.attn(layer, keys.in_bin(keys.PCK1, name))] = float((epe[sel] <= 1.0).float().mean())
        out[keys.attn(layer, keys.in_bin(keys.COUNT, name))] = float(sel.sum())
    return out


def supervised_copy(metrics: dict[str, float], layer: str) -> dict[str, float]:
    """The supervised layer's attention metrics again under `attn/supervised/`: runs that supervise
    different layers then share one column in reports."""
    prefix = keys.attn_prefix(layer)
    return {keys.SUPERVISED_PREFIX + k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}


@torch.no_grad()
def attention_metrics(model, diffusion, batches: list[dict], *, timestep: int, seed: int,
                      layers: Iterable[str] | None = None) -> dict[str, float]:
    """Attention-correspondence metrics of each attention layer at one noise level.

    Every batch with a truth is scored; one without (no depth) is skipped, never the batches
    already scored. Batch b's noise comes from `seed * 31 + b` whichever batches are skipped.
    """
    layer_specs = {layer.name: layer for layer in model.attention_layers()}
    names = list(layers) if layers is not None else list(layer_specs)
    collected: dict[str, list[dict[str, torch.Tensor]]] = {name: [] for name in names}
    plain = real_cameras(diffusion)
    for b, batch in enumerate(batches):
        if "depth" not in batch:  # no dense truth (sparse tracks/matches would be scored here)
            continue
        _, V, _, H, W = batch["image"].shape
        truth = {}  # stride -> token ground truth: layers at one stride share it
        for name in names:
            stride = layer_specs[name].stride
            grid = (V, H // stride, W // stride)
            if stride not in truth:
                truth[stride] = token_ground_truth(batch, grid, stride)
            tap = layer_tap(model, plain, batch, name, timestep=timestep, seed=seed * 31 + b)
            scores = attention_scores(tap, grid, *truth[stride])
            collected[name].append({key: value.cpu() for key, value in scores.items()})
    out: dict[str, float] = {}
    for name, parts in collected.items():
        if parts:
            out.update(summarise_attention({key: torch.cat([p[key] for p in parts]) for key in SCORES}, name))
    return out
