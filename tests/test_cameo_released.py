"""CameoLoss + `pointmap_nn` targets reproduce the released CAMEO training loss.

The reference below is written from the description of the released code (cvlab-kaist/CAMEO,
train.py and src/distill_utils/attn_logit_head.py), not from this package: the full N x N
per-head logit map of each sample, the head MLP over the head axis (with the released last-layer
bias, which the per-view softmax ignores), a softmax per key view, a target that is ONE argmax of
the negative 3D distance over all non-self key views jointly (so only one view gets a 1), the
cycle-check mask per key view, all-zero rows of the other valid views still counted in the mean,
-sum t log(p + 1e-8) per row, and the reference-query and target-query means summed. Unlike the
released code it reads token coordinates as (idx % w, idx // w), so non-square grids work (the
released cycle check assumes h = w).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from backbones.interface import TapResult
from cameo_bench.correspondence import compute_targets
from cameo_bench.correspondence.targets import CorrespondenceTargets
from cameo_bench.objectives.alignment import CameoLoss

B, V, HEADS, D, NUM_REF, STRIDE, TAU, EPS = 2, 3, 2, 8, 1, 2, 1.5, 1e-8
RELEASED_LAST_BIAS = 0.37  # any value: the per-view softmax removes it


def point_maps(h: int, w: int, seed: int = 0) -> torch.Tensor:  # [B, V, 3, H, W] float64
    """A smooth random surface seen by every view, each view's copy perturbed independently:
    nearest neighbours are mostly right, and the cycle check drops a share of them."""
    g = torch.Generator().manual_seed(seed)
    H, W = h * STRIDE, w * STRIDE
    v, u = torch.meshgrid(torch.linspace(0, 1, H, dtype=torch.float64),
                          torch.linspace(0, 1.5, W, dtype=torch.float64), indexing="ij")
    z = 0.3 * torch.sin(3 * u) * torch.cos(2 * v)
    surface = torch.stack([u, v, z])  # [3, H, W]
    noise = 0.3 * torch.randn(B, V, 3, H, W, generator=g, dtype=torch.float64)
    return surface + noise


def released_loss(q, k, scale, W1, b1, w2, point_map, h, w):
    """The released loss for all queries of every view, in float64 (see the module docstring).

    q, k [B, Hd, N, d]; W1 [4Hd, Hd], b1 [4Hd], w2 [1, 4Hd]; point_map [B, V, 3, H, W]."""
    q, k, W1, b1, w2 = (t.double() for t in (q, k, W1, b1, w2))
    T = h * w
    logits = torch.einsum("bhqd,bhkd->bqkh", q, k) * scale  # [B, N, N, Hd]: every pair, every head
    fused = F.gelu(logits @ W1.T + b1) @ w2.T + RELEASED_LAST_BIAS  # [B, N, N, 1]
    fused = fused[..., 0].reshape(B, V, T, V, T)  # query view, query token, key view, key token
    log_p = torch.log(fused.softmax(-1) + EPS)  # softmax per key view

    tokens = F.interpolate(point_map.flatten(0, 1), size=(h, w), mode="bilinear", align_corners=False)
    X = tokens.reshape(B, V, 3, T).transpose(2, 3)  # [B, V, T, 3]
    neg_dist = -torch.cdist(X.reshape(B, V * T, 3), X.reshape(B, V * T, 3)).reshape(B, V, T, V, T)

    def grid_xy(t: int) -> torch.Tensor:
        return torch.tensor([t % w, t // w], dtype=torch.float64)

    total = 0.0
    for query_views in (range(NUM_REF), range(NUM_REF, V)):  # reference queries, then target queries
        rows_loss, rows = 0.0, 0
        for b in range(B):
            for i in query_views:
                keys = [j for j in range(V) if j != i]
                for t in range(T):
                    joint = torch.stack([neg_dist[b, i, t, j] for j in keys])  # [V-1, T]
                    best = int(joint.flatten().argmax())
                    target_view, target_token = keys[best // T], best % T
                    for j in keys:
                        forward = int(neg_dist[b, i, t, j].argmax())  # nearest token in view j
                        back = int(neg_dist[b, j, forward, i].argmax())  # and back in view i
                        if (grid_xy(back) - grid_xy(t)).norm() >= TAU:
                            continue  # cycle check fails: this (query, key view) row is masked
                        rows += 1
                        if j == target_view:
                            rows_loss = rows_loss - log_p[b, i, t, j, target_token]
                        # other valid views: an all-zero target row, counted but adding 0
        if rows:
            total = total + rows_loss / rows
    return total


def loss_and_reference(h: int, w: int, seed: int = 0, **options):
    g = torch.Generator().manual_seed(seed + 1)
    N = V * h * w
    q = (1.5 * torch.randn(B, HEADS, N, D, generator=g)).requires_grad_(True)
    k = (1.5 * torch.randn(B, HEADS, N, D, generator=g)).requires_grad_(True)
    point_map = point_maps(h, w, seed)
    targets = compute_targets("pointmap_nn", {"point_map": point_map}, (V, h, w), STRIDE, tau=TAU)
    cameo = CameoLoss(HEADS, head="mlp", target="onehot_global", **{"log_eps": EPS, **options})
    with torch.no_grad():
        for p in cameo.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    tap = TapResult(q=q, k=k, scale=D**-0.5, grid=(V, h, w), query_idx=torch.arange(N).expand(B, N))
    got, _ = cameo(tap, targets, NUM_REF)
    first, _, last = cameo.head
    want = released_loss(q, k, D**-0.5, first.weight, first.bias, last.weight, point_map, h, w)
    leaves = [q, k, *cameo.parameters()]
    return got, want, leaves, targets, tap, cameo


def max_errors(got, want, leaves) -> tuple[float, list[float]]:
    """Absolute error of the value and, per leaf, max |grad error| / max |grad|."""
    g_got = torch.autograd.grad(got, leaves, retain_graph=True)
    g_want = torch.autograd.grad(want, leaves, retain_graph=True)
    rel = [float((a.double() - b.double()).abs().max() / b.double().abs().max()) for a, b in zip(g_got, g_want)]
    return abs(got.item() - want.item()), rel


@pytest.mark.parametrize("h,w", [(4, 6), (6, 4), (5, 5)])
@pytest.mark.parametrize("options", [{}, {"chunk_size": 7}, {"chunk_size": 5, "backward": "checkpoint"}])
def test_onehot_global_mlp_pointmap_nn_equals_the_released_loss(h, w, options):
    got, want, leaves, targets, *_ = loss_and_reference(h, w, **options)
    valid_share = targets.valid.float().sum() / (B * V * h * w * (V - 1))
    assert 0.5 < valid_share < 0.97  # the cycle check really masks some rows, and keeps most
    value_err, grad_err = max_errors(got, want, leaves)
    assert value_err < 1e-5 * max(1.0, abs(want.item())), value_err
    assert max(grad_err) < 1e-5, grad_err  # q, k, head.0.weight, head.0.bias, head.2.weight


def test_the_comparison_detects_what_the_fix_changed():
    """Without the cost the loss falls back to the first valid view, and with log_eps 0 it takes
    the exact log: both move the value far outside the tolerance above, so the test has teeth."""
    _, want, _, targets, tap, cameo = loss_and_reference(4, 6)
    no_cost = CorrespondenceTargets(targets.idx, targets.weight, targets.valid, targets.grid)
    fallback, _ = cameo(tap, no_cost, NUM_REF)
    exact = CameoLoss(HEADS, head="mlp", target="onehot_global")
    exact.load_state_dict(cameo.state_dict())
    exact_log, _ = exact(tap, targets, NUM_REF)
    assert abs(fallback.item() - want.item()) > 1e-2
    assert abs(exact_log.item() - want.item()) > 1e-2
