"""Evaluation metrics against hand-built cases: analytic token ground truth, perfect and shifted
attention, attention scores against a naive loop, PSNR formula, LPIPS reported as unavailable,
batches without depth, identity-perturbation analysis."""
import logging
import math
import types

import pytest
import torch

from backbones import create_backbone
from cameo_bench.evaluation import attention as A
from cameo_bench.evaluation import consistency as C
from cameo_bench.evaluation import evaluate as E
from cameo_bench.evaluation import metrics as M
from cameo_bench.objectives.diffusion import MultiViewDiffusion
from cameo_bench.config.spec import EvalSpec
from cameo_bench.tracking import keys


def plane_batch(V=3, H=16, W=16, f=16.0, Z=4.0, shift_px=2.0):
    """A fronto-parallel plane at depth Z; camera v sits at x = v*b so that each view sees the
    plane shifted by exactly -shift_px pixels per view (disparity f b / Z = shift_px)."""
    b = shift_px * Z / f
    K = torch.tensor([[f, 0, (W - 1) / 2], [0, f, (H - 1) / 2], [0, 0, 1.0]])
    c2w = torch.eye(4).repeat(V, 1, 1)
    c2w[:, 0, 3] = torch.arange(V) * b
    return {
        "image": torch.rand(1, V, 3, H, W),
        "depth": torch.full((1, V, H, W), Z),
        "intrinsics": K.expand(1, V, 3, 3).clone(),
        "cam2world": c2w[None],
        "num_ref": 1,
    }


def test_token_ground_truth_matches_analytic_disparity():
    stride = 2
    batch = plane_batch(shift_px=2.0)  # one token per view step
    grid = (3, 8, 8)
    xy, valid, angle = A.token_ground_truth(batch, grid, stride)
    ys, xs = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    expected = torch.stack([xs, ys], -1).reshape(64, 2)
    # view 0 -> view 1: camera moved +x by one token, points move -1 token in x
    ok = valid[0, 0, 1]
    assert ok.sum() == 56  # the first token column leaves the image
    assert torch.allclose(xy[0, 0, 1][ok], (expected + torch.tensor([-1.0, 0.0]))[ok], atol=1e-4)
    assert torch.allclose(xy[0, 0, 2][valid[0, 0, 2]], (expected + torch.tensor([-2.0, 0.0]))[valid[0, 0, 2]], atol=1e-4)
    assert not valid[0, 1, 1].any() and torch.allclose(angle, torch.zeros(1, 3, 3), atol=1e-3)


def fake_tap(grid, target_xy, valid, shift=(0, 0), heads=2, sharp=50.0):
    """A tap whose logits peak at the ground truth (plus a token shift): q_n . k_m is large only
    when key m is the (shifted) target of query n."""
    V, h, w = grid
    n = h * w
    N = V * n
    # one-hot "positions": key m of view j has feature e_{j*n+m}; query n of view i gets the sum of
    # the features of its targets in every other view
    k = torch.eye(N)[None, None].repeat(1, heads, 1, 1) * sharp  # [1, H, N, N]
    q = torch.zeros(1, heads, N, N)
    for i in range(V):
        for j in range(V):
            if i == j:
                continue
            for p in range(n):
                if not valid[0, i, j, p]:
                    continue
                x, y = target_xy[0, i, j, p].round().long().tolist()
                x, y = min(max(x + shift[0], 0), w - 1), min(max(y + shift[1], 0), h - 1)
                q[0, :, i * n + p, j * n + y * w + x] = 1.0
    return types.SimpleNamespace(q=q, k=k, scale=1.0 * heads)  # head-mean cancels heads


def test_attention_scores_perfect_and_shifted():
    batch = plane_batch()
    grid = (3, 8, 8)
    xy, valid, angle = A.token_ground_truth(batch, grid, 2)
    perfect = A.summarise_attention(A.attention_scores(fake_tap(grid, xy, valid), grid, xy, valid, angle), "a")
    assert perfect[keys.ATTN + "a/pck@0.5"] == 1.0 and perfect[keys.ATTN + "a/epe"] < 1e-4 and perfect[keys.ATTN + "a/mass1"] > 0.99
    assert perfect[keys.ATTN + "a/pck@1/0-30"] == 1.0
    shifted = A.summarise_attention(A.attention_scores(fake_tap(grid, xy, valid, shift=(0, 1)), grid, xy, valid, angle), "a")
    # one token off in y (clamped at the border for the last row): pck@0.5 drops, pck@1 holds
    assert shifted[keys.ATTN + "a/pck@0.5"] < 0.2 and shifted[keys.ATTN + "a/pck@1"] == 1.0
    assert shifted[keys.ATTN + "a/mass1"] > 0.99  # the peak is within one token of the truth


def test_attention_scores_match_a_naive_loop():
    """End-point error of the argmax and mass within one token, on random attention, against a
    loop over every (scene, query view, key view, query) with the head-mean per-view softmax."""
    g = torch.Generator().manual_seed(0)
    B, heads, d, grid = 2, 2, 4, (3, 2, 3)
    V, h, w = grid
    n = h * w
    tap = types.SimpleNamespace(q=torch.randn(B, heads, V * n, d, generator=g),
                                k=torch.randn(B, heads, V * n, d, generator=g), scale=0.8)
    gt_xy = torch.rand(B, V, V, n, 2, generator=g) * torch.tensor([w - 1.0, h - 1.0])
    gt_valid = torch.rand(B, V, V, n, generator=g) < 0.7
    angle = torch.rand(B, V, V, generator=g) * 120
    got = A.attention_scores(tap, grid, gt_xy, gt_valid, angle)
    epe, mass, bins = [], [], []
    for i in range(V):
        for j in range(V):
            for b in range(B):
                for p in range(n):
                    if i == j or not gt_valid[b, i, j, p]:
                        continue
                    logits = torch.tensor([sum(float(tap.q[b, hh, i * n + p] @ tap.k[b, hh, j * n + m])
                                               for hh in range(heads)) * 0.8 / heads for m in range(n)])
                    probs = logits.exp() / logits.exp().sum()
                    best = int(logits.argmax())
                    gx, gy = gt_xy[b, i, j, p].tolist()
                    epe.append(math.hypot(best % w - gx, best // w - gy))
                    mass.append(sum(float(probs[m]) for m in range(n) if math.hypot(m % w - gx, m // w - gy) <= 1.0))
                    bins.append(float(angle[b, i, j]))
    assert torch.allclose(got["epe"], torch.tensor(epe), atol=1e-5)
    assert torch.allclose(got["mass"], torch.tensor(mass), atol=1e-5)
    assert torch.allclose(got["angle"], torch.tensor(bins))


def test_key_view_attention_keeps_leading_dims():
    """[B, H, Q, d] queries give [B, Q, V, h, w]: a per-view softmax of the head-mean logits."""
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 12, 5, generator=g)
    out = A.key_view_attention(q, k, 0.5, (2, 2, 3))
    assert out.shape == (2, 4, 2, 2, 3)
    for b in range(2):
        for v in range(2):
            logits = torch.einsum("hqd,hnd->qn", q[b].double(), k[b, :, v * 6:(v + 1) * 6].double()) * 0.5 / 3
            assert torch.allclose(out[b, :, v].flatten(1).double(), logits.softmax(-1), atol=1e-6)
    with pytest.raises(ValueError, match="grid"):
        A.key_view_attention(q, k, 0.5, (2, 2, 2))


def test_attention_metrics_skip_a_batch_without_depth_and_keep_the_others():
    torch.manual_seed(0)
    model = create_backbone("mv_dit", "micro", sample_size=16)
    assert model.get_attention_layer("blocks.00.attn").stride == 2  # one token per 2 pixels of disparity
    with_depth = plane_batch()
    without_depth = {k: v for k, v in plane_batch().items() if k != "depth"}
    out = A.attention_metrics(model, MultiViewDiffusion(), [with_depth, without_depth, with_depth],
                              timestep=500, seed=0, layers=["blocks.00.attn"])
    # every query with a truth is counted: per scored batch, 4 view pairs one token apart (56 of the
    # 64 tokens stay in view) and 2 pairs two tokens apart (48 stay), all at 0 deg
    assert out[keys.ATTN + "blocks.00.attn/count/0-30"] == 2 * (4 * 56 + 2 * 48)
    assert 0.0 <= out[keys.ATTN + "blocks.00.attn/pck@1"] <= 1.0
    assert A.attention_metrics(model, MultiViewDiffusion(), [without_depth], timestep=500, seed=0) == {}


def test_psnr_matches_formula():
    gt = torch.rand(4, 3, 16, 16)
    pred = (gt + 0.05 * torch.randn_like(gt)).clamp(0, 1)
    mse = ((pred - gt) ** 2).flatten(1).mean(1)
    metrics = M.image_metrics(pred, gt)
    assert torch.allclose(metrics["psnr"], 10 * torch.log10(1 / mse), atol=1e-4)
    assert torch.all(M.image_metrics(gt, gt)["ssim"] > 0.999)


def test_lpips_without_weights_is_reported_once_and_not_logged(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(M.LpipsScorer, "_warned", set())
    with caplog.at_level(logging.WARNING):
        scorers = [M.LpipsScorer("vgg"), M.LpipsScorer("vgg"), M.LpipsScorer("alex")]
    assert not any(s.available for s in scorers)
    assert sum("LPIPS-vgg unavailable" in r.message for r in caplog.records) == 1


def test_consistency_of_ground_truth_images_is_small_on_a_plane():
    batch = plane_batch(shift_px=2.0)
    # a texture that moves with the plane: view v is view 0 shifted by -2v pixels
    base = torch.rand(1, 3, 16, 24)
    batch["image"] = torch.stack([base[..., 2 * v:2 * v + 16] for v in range(3)], 1)
    err = C.warp_error(batch["image"], batch, [(1, 2), (2, 1)])
    assert err.numel() > 0 and err.max() < 1e-5


def test_evaluate_and_perturbation_analysis_on_micro_dit():
    torch.manual_seed(0)
    model = create_backbone("mv_dit", "micro", sample_size=16)
    for p in model.parameters():  # the zero-initialised output would make every layer irrelevant
        p.data.add_(0.05 * torch.randn_like(p))
    diffusion = MultiViewDiffusion()
    batch = plane_batch()
    spec = EvalSpec(sampler_steps=2, lpips=False)
    metrics = E.evaluate(model, diffusion, [batch], spec, supervised_layer="blocks.01.attn")
    assert math.isfinite(metrics["eval/psnr"]) and keys.ATTN + "blocks.00.attn/pck@1" in metrics
    assert metrics[keys.ATTN + "supervised/pck@1"] == metrics[keys.ATTN + "blocks.01.attn/pck@1"]
    drops = E.perturbation_analysis(model, diffusion, [batch], spec)
    assert {"perturb/blocks.00.attn/psnr_drop", "perturb/blocks.01.attn/psnr_drop"} <= set(drops)
    assert any(abs(v) > 1e-6 for k, v in drops.items() if k.endswith("psnr_drop"))


def _yaw(deg: float) -> torch.Tensor:
    """Camera-to-world rotating by `deg` about the world z axis (nothing else changes)."""
    a = math.radians(deg)
    m = torch.eye(4)
    m[:2, :2] = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return m


def test_target_view_angles_use_the_nearest_reference():
    # two references at 0 and 100 deg; targets at 20, 70 and 130 deg -> nearest 20, 30, 30
    c2w = torch.stack([_yaw(d) for d in (0.0, 100.0, 20.0, 70.0, 130.0)])[None]
    angles = M.target_view_angles(c2w, num_ref=2)
    assert angles.shape == (1, 3)
    assert torch.allclose(angles[0], torch.tensor([20.0, 30.0, 30.0]), atol=1e-3)


def test_quality_by_bin_against_a_hand_loop():
    psnr = torch.tensor([10.0, 12.0, 20.0, 30.0, 31.0])
    angle = torch.tensor([5.0, 29.0, 45.0, 95.0, 200.0])
    out = M.quality_by_bin({"psnr": psnr}, angle)
    assert out["eval/psnr/0-30"] == pytest.approx(11.0)
    assert out["eval/psnr/30-60"] == pytest.approx(20.0)
    assert "eval/psnr/60-90" not in out  # empty bins are not reported
    assert out["eval/psnr/90+"] == pytest.approx(30.5)
    assert out["eval/count/0-30"] == 2 and out["eval/count/90+"] == 2


def test_evaluate_reports_quality_per_viewpoint_bin():
    torch.manual_seed(0)
    model = create_backbone("mv_dit", "micro", sample_size=16)
    batch = plane_batch()  # pure translations: every target is 0 deg from the reference
    metrics = E.evaluate(model, MultiViewDiffusion(), [batch], EvalSpec(sampler_steps=2, lpips=False, attention=False))
    assert metrics["eval/psnr/0-30"] == pytest.approx(metrics["eval/psnr"])
    assert metrics["eval/count/0-30"] == 2
