"""Floors, the depth-warp oracle, the fixed-noise convergence metrics and the FLOP count, against hand
computations: tiny images whose floor images and PSNRs are written out here, a fronto-parallel plane
seen by translated cameras (where the oracle must reproduce the target), an oracle denoiser that
knows x0 (zero held-out loss, exact x0), and FLOPs of a linear layer and of attention by formula."""
import math

import pytest
import torch

from cameo_bench.evaluation import convergence as CV
from cameo_bench.evaluation import floors as FL
from cameo_bench.objectives.diffusion import MultiViewDiffusion
from cameo_bench.tracking import keys


def _yaw(deg: float) -> torch.Tensor:
    """Camera-to-world rotating by `deg` about the world z axis (nothing else changes)."""
    a = math.radians(deg)
    m = torch.eye(4)
    m[:2, :2] = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return m


def flat_batch(ref_colours, target_colours, yaws, H=16, W=16):
    """One sample of constant-colour views: references first, then targets."""
    colours = list(ref_colours) + list(target_colours)
    image = torch.stack([torch.tensor(c).view(3, 1, 1).expand(3, H, W) for c in colours])[None]  # [1, V, 3, H, W]
    K = torch.tensor([[16.0, 0, (W - 1) / 2], [0, 16.0, (H - 1) / 2], [0, 0, 1.0]])
    return {"image": image.float(), "intrinsics": K.expand(1, len(colours), 3, 3).clone(),
            "cam2world": torch.stack([_yaw(d) for d in yaws])[None], "num_ref": len(ref_colours)}


def psnr_of_mse(mse: float) -> float:
    return 10 * math.log10(1 / mse)


def test_mean_colour_is_the_per_channel_mean_over_all_reference_pixels():
    batch = flat_batch([(0.2, 0.4, 0.6), (0.4, 0.0, 1.0)], [(0.5, 0.5, 0.5)], [0, 90, 45])
    batch["image"][0, 0, :, :8] = 0.0  # half of reference 0 black: its mean is halved
    pred = FL.mean_colour(batch["image"], 2)  # [1, 1, 3, H, W]
    expected = torch.tensor([(0.1 + 0.4) / 2, (0.2 + 0.0) / 2, (0.3 + 1.0) / 2])
    assert pred.shape == (1, 1, 3, 16, 16)
    assert torch.allclose(pred[0, 0, :, 3, 5], expected) and torch.allclose(pred.amax((3, 4)), pred.amin((3, 4)))


def test_copy_nearest_takes_the_reference_with_the_smallest_rotation():
    # references at 0 and 100 degrees; targets at 20 (-> ref 0) and 70 (-> ref 1, 30 degrees away)
    batch = flat_batch([(0.1, 0.1, 0.1), (0.9, 0.9, 0.9)], [(0.2, 0.2, 0.2), (0.7, 0.7, 0.7)], [0, 100, 20, 70])
    assert FL.nearest_reference(batch["cam2world"], 2).tolist() == [[0, 1]]
    pred = FL.copy_nearest(batch)
    assert torch.equal(pred[0, 0], batch["image"][0, 0]) and torch.equal(pred[0, 1], batch["image"][0, 1])


def test_floor_scores_match_hand_psnr_and_name_every_metric_and_bin():
    # one reference of colour (0.2, 0.4, 0.6), targets at 20 and 40 degrees of colour (0.3, 0.4, 0.6)
    # and (0.2, 0.4, 0.2): mean colour = copy = the reference; MSE over channels 0.01 / 3 and 0.16 / 3
    batch = flat_batch([(0.2, 0.4, 0.6)], [(0.3, 0.4, 0.6), (0.2, 0.4, 0.2)], [0, 20, 40])
    scores = FL.FloorScores()
    scores.add(batch, torch.tensor([20.0, 40.0]))
    out = scores.metrics()
    a, b = psnr_of_mse(0.01 / 3), psnr_of_mse(0.16 / 3)
    for predictor in keys.FLOOR_PREDICTORS:
        assert out[f"eval/floor/{predictor}/psnr"] == pytest.approx((a + b) / 2, abs=1e-4)
        assert out[f"eval/floor/{predictor}/psnr/0-30"] == pytest.approx(a, abs=1e-4)
        assert out[f"eval/floor/{predictor}/psnr/30-60"] == pytest.approx(b, abs=1e-4)
        assert 0 < out[f"eval/floor/{predictor}/ssim"] <= 1
    assert not any(k.startswith(keys.ORACLE) for k in out)  # no depth, no oracle


def test_floor_scores_pool_batches_image_by_image():
    first = flat_batch([(0.5, 0.5, 0.5)], [(0.6, 0.6, 0.6)], [0, 10])  # MSE 0.01
    second = flat_batch([(0.5, 0.5, 0.5)], [(0.3, 0.3, 0.3)], [0, 10])  # MSE 0.04
    scores = FL.FloorScores()
    for batch in (first, second):
        scores.add(batch, torch.tensor([10.0]))
    assert scores.metrics()["eval/floor/mean_colour/psnr"] == pytest.approx((20 + psnr_of_mse(0.04)) / 2, abs=1e-4)


def plane_batch(V=3, H=16, W=16, f=16.0, Z=4.0, shift_px=2.0):
    """A textured fronto-parallel plane at depth Z, camera v at x = v b: view v sees the plane
    shifted by -v shift_px pixels (disparity f b / Z), i.e. view v is the texture's columns from 2v."""
    b = shift_px * Z / f
    K = torch.tensor([[f, 0, (W - 1) / 2], [0, f, (H - 1) / 2], [0, 0, 1.0]])
    c2w = torch.eye(4).repeat(V, 1, 1)
    c2w[:, 0, 3] = torch.arange(V) * b
    texture = torch.rand(3, H, W + int(shift_px) * V, generator=torch.Generator().manual_seed(0))
    image = torch.stack([texture[:, :, int(shift_px) * v:int(shift_px) * v + W] for v in range(V)])[None]
    return {"image": image, "depth": torch.full((1, V, H, W), Z), "intrinsics": K.expand(1, V, 3, 3).clone(),
            "cam2world": c2w[None], "num_ref": 1}


def test_depth_warp_reproduces_a_plane_and_fills_what_leaves_the_reference_with_the_mean_colour():
    batch = plane_batch()
    pred = FL.depth_warp(batch)  # [1, 2, 3, 16, 16]
    ref, mean = batch["image"][0, 0], batch["image"][0, 0].mean((1, 2))
    # target 1 pixel x is reference pixel x + 2 (columns 14, 15 leave the reference); target 2: x + 4
    for t, shift in ((0, 2), (1, 4)):
        assert torch.allclose(pred[0, t, :, :, :16 - shift], ref[:, :, shift:], atol=1e-5)
        assert torch.allclose(pred[0, t, :, :, 16 - shift:], mean[:, None, None].expand(3, 16, shift), atol=1e-6)
        assert torch.allclose(pred[0, t, :, :, :16 - shift], batch["image"][0, t + 1, :, :, :16 - shift], atol=1e-5)
    scores = FL.FloorScores()
    scores.add(batch, torch.zeros(2))
    out = scores.metrics()
    oracle, best_floor = out["eval/oracle/depth_warp/psnr"], max(out[f"eval/floor/{p}/psnr"] for p in keys.FLOOR_PREDICTORS)
    assert oracle > best_floor + 5 and out["eval/oracle/depth_warp/ssim"] > 0.7


def test_depth_warp_does_not_copy_through_an_occluder():
    batch = plane_batch()
    batch["depth"][0, 0, :, 4:8] = 2.0  # the reference sees something closer at columns 4-7
    pred = FL.depth_warp(batch)
    mean = batch["image"][0, 0].mean((1, 2))
    # target 1 pixels x = 2..5 land on reference columns 4..7, where the reference's depth disagrees
    assert torch.allclose(pred[0, 0, :, :, 2:6], mean[:, None, None].expand(3, 16, 4), atol=1e-6)
    assert torch.allclose(pred[0, 0, :, :, :1], batch["image"][0, 0, :, :, 2:3], atol=1e-5)


# --- convergence metrics ------------------------------------------------------------------------


def test_fixed_timesteps_spread_over_the_schedule_and_contain_the_x0_timesteps():
    assert CV.loss_timesteps(1000) == [0, 125, 250, 375, 500, 625, 750, 875]
    assert CV.loss_timesteps(1000, 4) == [0, 250, 500, 750] and CV.loss_timesteps(1000, 3) == [0, 333, 666]
    assert CV.x0_timesteps(1000) == [250, 500, 750] and set(CV.x0_timesteps(1000)) <= set(CV.loss_timesteps(1000))
    assert torch.equal(CV.fixed_noise((2, 3), 0, 1, 250), CV.fixed_noise((2, 3), 0, 1, 250))
    assert not torch.equal(CV.fixed_noise((2, 3), 0, 1, 250), CV.fixed_noise((2, 3), 0, 2, 250))


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_predict_x0_inverts_the_forward_process(prediction_type):
    diffusion = MultiViewDiffusion(prediction_type=prediction_type)
    x0, noise = torch.randn(3, 2, 4, 5, 5), torch.randn(3, 2, 4, 5, 5)
    t = torch.tensor([10, 500, 990])
    a = diffusion.alphas_cumprod[t].double()
    x_t = a.sqrt().view(-1, 1, 1, 1, 1) * x0 + (1 - a).sqrt().view(-1, 1, 1, 1, 1) * noise  # by hand
    target = (a.sqrt().view(-1, 1, 1, 1, 1) * noise - (1 - a).sqrt().view(-1, 1, 1, 1, 1) * x0
              if prediction_type == "v_prediction" else noise)
    x0_hat = CV.predict_x0(x_t.double(), target.double(), a, prediction_type)
    assert torch.allclose(x0_hat, x0.double(), atol=1e-9)


class OracleDenoiser:
    """Knows the clean views of its batch: returns the exact v target, so the loss is 0 and x0 exact."""

    def __init__(self, diffusion, x0):
        self.diffusion, self.x0 = diffusion, x0

    def __call__(self, x_t, t, **kwargs):
        a = self.diffusion.alphas_cumprod[t].double().view(-1, 1, 1, 1, 1)
        eps = (x_t.double() - a.sqrt() * self.x0.double()) / (1 - a).sqrt()
        v = a.sqrt() * eps - (1 - a).sqrt() * self.x0.double()
        return type("Out", (), {"sample": v.float(), "tap": None})()


class ZeroModel:
    def __call__(self, x_t, t, **kwargs):
        return type("Out", (), {"sample": torch.zeros_like(x_t), "tap": None})()


def test_an_oracle_denoiser_has_zero_heldout_loss_and_exact_x0_while_a_zero_model_does_not():
    diffusion = MultiViewDiffusion(prediction_type="v_prediction")
    batch = plane_batch()
    oracle = CV.convergence_metrics(OracleDenoiser(diffusion, batch["image"] * 2 - 1), diffusion, [batch], seed=3)
    assert set(oracle) == ({keys.HELDOUT_LOSS} | {f"eval/heldout_loss/t{t:04d}" for t in CV.loss_timesteps(1000)}
                           | {f"eval/x0_psnr/t{t:04d}" for t in (250, 500, 750)})
    assert oracle[keys.HELDOUT_LOSS] < 1e-8 and all(oracle[f"eval/x0_psnr/t{t:04d}"] > 60 for t in (250, 500, 750))
    zero = CV.convergence_metrics(ZeroModel(), diffusion, [batch], seed=3)
    assert zero[keys.HELDOUT_LOSS] > 0.1
    # zero v: x0_hat = sqrt(a) x_t = a x0 + sqrt(a (1 - a)) eps on the targets, decoded as (x + 1) / 2
    x0 = batch["image"] * 2 - 1
    eps = CV.fixed_noise(tuple(x0.shape), 3, 0, 500)
    a = float(diffusion.alphas_cumprod[500])
    image = ((a * x0 + math.sqrt(a * (1 - a)) * eps + 1) / 2).clamp(0, 1)
    mse = (image[0, 1:] - batch["image"][0, 1:]).pow(2).mean((1, 2, 3))  # per target view
    assert zero["eval/x0_psnr/t0500"] == pytest.approx(float((10 * torch.log10(1 / mse)).mean()), rel=1e-5)
    assert CV.convergence_metrics(ZeroModel(), diffusion, [batch], seed=3) == zero  # fixed noise: same numbers
    three = CV.convergence_metrics(ZeroModel(), diffusion, [batch], seed=3, num_timesteps=3)
    assert set(three) == ({keys.HELDOUT_LOSS} | {f"eval/heldout_loss/t{t:04d}" for t in (0, 333, 666)}
                          | {f"eval/x0_psnr/t{t:04d}" for t in (250, 500, 750)})
    assert three["eval/x0_psnr/t0500"] == zero["eval/x0_psnr/t0500"]


class CopyReferenceModel:
    """Predicts every view's x0 as the (clean) first reference it is given: v = (sqrt(a) x_t - x0_hat) / sqrt(1 - a)."""

    def __init__(self, diffusion):
        self.alphas = diffusion.alphas_cumprod

    def __call__(self, x_t, t, **kwargs):
        a = self.alphas[t].reshape(-1, 1, 1, 1, 1).to(x_t)
        x0_hat = x_t[:, :1].expand_as(x_t)
        return type("Out", (), {"sample": (a.sqrt() * x_t - x0_hat) / (1 - a).sqrt(), "tap": None})()


def two_scene_batch():
    """Two scenes of 2 views (1 reference): each target is its reference plus a little noise."""
    g = torch.Generator().manual_seed(1)
    ref = torch.rand(2, 1, 3, 8, 8, generator=g)
    target = (ref + 0.05 * torch.randn(ref.shape, generator=g)).clamp(0, 1)
    c2w = torch.eye(4).repeat(2, 2, 1, 1)
    K = torch.tensor([[8.0, 0, 3.5], [0, 8.0, 3.5], [0, 0, 1]]).expand(2, 2, 3, 3).clone()
    return {"image": torch.cat([ref, target], 1), "depth": torch.full((2, 2, 8, 8), 2.0), "intrinsics": K,
            "cam2world": c2w, "num_ref": 1}


def test_reference_use_is_zero_for_a_model_that_ignores_references_and_the_hand_computed_drop_for_a_copier():
    diffusion = MultiViewDiffusion(prediction_type="v_prediction")
    batch = two_scene_batch()
    name = keys.REFERENCE_USE
    assert CV.convergence_metrics(ZeroModel(), diffusion, [batch], seed=3)[name] == pytest.approx(0.0, abs=1e-5)

    def psnr(a, b):  # per image, images in [0, 1]
        return 10 * torch.log10(1 / (a.clamp(0, 1) - b).pow(2).mean((1, 2, 3)))

    ref, target = batch["image"][:, 0], batch["image"][:, 1]
    expected = float((psnr(ref, target) - psnr(ref.roll(1, 0), target)).mean())
    out = CV.convergence_metrics(CopyReferenceModel(diffusion), diffusion, [batch], seed=3)
    assert expected > 3 and out[name] == pytest.approx(expected, rel=1e-4)
    # one scene per batch: nothing to borrow from, so no number rather than a wrong one
    single = {k: (v[:1] if torch.is_tensor(v) else v) for k, v in batch.items()}
    assert name not in CV.convergence_metrics(CopyReferenceModel(diffusion), diffusion, [single], seed=3)


def test_heldout_loss_at_a_fixed_timestep_is_the_hand_computed_mse_of_a_zero_model():
    """A zero model's loss at t is the mean over target views of v^2, v = sqrt(a) eps - sqrt(1-a) x0,
    with eps the fixed noise of (seed, batch, t)."""
    diffusion = MultiViewDiffusion(prediction_type="v_prediction")
    batch = plane_batch()
    out = CV.convergence_metrics(ZeroModel(), diffusion, [batch], seed=5)
    x0 = batch["image"] * 2 - 1
    for t in (125, 500):
        eps = CV.fixed_noise(tuple(x0.shape), 5, 0, t)
        a = float(diffusion.alphas_cumprod[t])
        v = math.sqrt(a) * eps - math.sqrt(1 - a) * x0
        assert out[f"eval/heldout_loss/t{t:04d}"] == pytest.approx(float(v[:, 1:].pow(2).mean()), rel=1e-5)


# --- FLOPs --------------------------------------------------------------------------------------


def test_flop_count_of_a_linear_layer_is_six_b_in_out_with_backward():
    from cameo_bench.engine.compute import count_flops

    layer = torch.nn.Linear(32, 16, bias=False)
    x = torch.randn(8, 32, requires_grad=True)
    assert count_flops(lambda: layer(x).sum().backward()) == 3 * 2 * 8 * 32 * 16  # forward, grad x, grad W


def test_cpu_attention_is_counted_by_the_attention_formula():
    from cameo_bench.engine.compute import count_flops

    q = torch.randn(2, 4, 64, 32)
    forward = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert forward == 2 * (2 * 2 * 4 * 64 * 64 * 32)  # QK^T and AV, 2 FLOPs per multiply-add


def _run(tmp_path, *bindings):
    from cameo_bench import config
    from cameo_bench.engine.build import build_run

    exp = config.parse(["gin/experiments/smoke.gin"], [f"run_experiment.output_dir = '{tmp_path}'", *bindings])
    exp.train.progress = False
    return build_run(exp)


def test_train_flops_of_a_run_leave_it_untouched_and_grow_with_cameo(tmp_path):
    from cameo_bench.engine.compute import compute_metrics

    torch.set_num_threads(1)
    base = _run(tmp_path, "cameo.weight = 0.0")
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    rng = torch.get_rng_state()
    flops_base = compute_metrics(base)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in base.model.state_dict().items())
    assert all(p.grad is None for p in base.step_module.parameters())
    cameo = compute_metrics(_run(tmp_path, "cameo.weight = 0.5"))
    assert cameo[keys.TRAIN_FLOPS_PER_STEP] > flops_base[keys.TRAIN_FLOPS_PER_STEP] > 0
    assert flops_base[keys.PARAM_COUNT] == sum(p.numel() for p in base.model.parameters())
    assert flops_base[keys.HEAD_PARAM_COUNT] == 0
    # a training step is forward + backward: backward of linear / conv layers costs about twice
    # the forward (the first conv has no input gradient, attention's backward 2.5x)
    fwd = _forward_flops(base)
    assert 2.5 * fwd < flops_base[keys.TRAIN_FLOPS_PER_STEP] < 3.6 * fwd


def _forward_flops(run) -> int:
    from cameo_bench.engine.compute import count_flops
    from cameo_bench.engine.step import draw, local_batch

    batch, positions = local_batch(run, 0)
    draws = draw(run, batch, 0, positions)
    with torch.no_grad():
        return count_flops(lambda: run.step_module(batch, draws, None, None))


# --- evaluate: floors are additions, once per run, independent of the model ---------------------


def test_evaluate_adds_floors_and_convergence_metrics_without_changing_the_others():
    from backbones import create_backbone
    from cameo_bench.config.spec import EvalSpec
    from cameo_bench.evaluation.evaluate import evaluate

    torch.manual_seed(0)
    models = [create_backbone("mv_dit", "micro", sample_size=16) for _ in range(2)]
    for p in models[1].parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    batch, diffusion = plane_batch(), MultiViewDiffusion()
    spec = EvalSpec(sampler_steps=2, lpips=False, attention=False)
    with_floors = [evaluate(m, diffusion, [batch], spec) for m in models]
    without = evaluate(models[0], diffusion, [batch], spec, floors=False)
    floor_keys = {k for k in with_floors[0] if k.startswith((keys.FLOOR, keys.ORACLE))}
    assert {"eval/floor/mean_colour/psnr", "eval/floor/copy_nearest/ssim", "eval/oracle/depth_warp/psnr",
            "eval/floor/mean_colour/psnr/0-30"} <= floor_keys
    assert not any(k.startswith((keys.FLOOR, keys.ORACLE)) for k in without)
    assert {k: v for k, v in with_floors[0].items() if k not in floor_keys} == without  # additions only
    assert all(with_floors[0][k] == with_floors[1][k] for k in floor_keys)  # the model does not matter
    assert keys.HELDOUT_LOSS in without and "eval/x0_psnr/t0500" in without
    assert with_floors[0][keys.HELDOUT_LOSS] != with_floors[1][keys.HELDOUT_LOSS]
    quiet = evaluate(models[0], diffusion, [batch], EvalSpec(sampler_steps=2, lpips=False, attention=False,
                                                              convergence_timesteps=0), floors=False)
    assert keys.HELDOUT_LOSS not in quiet and quiet[keys.PSNR] == without[keys.PSNR]


def test_a_training_run_logs_floors_once_and_its_compute_at_step_0(tmp_path):
    from cameo_bench.engine.loop import fit
    from cameo_bench.tracking.run_log import read_metrics

    torch.set_num_threads(1)
    run = _run(tmp_path, "run_experiment.name = 'r'", "train.steps = 4", "eval.every = 2", "eval.at_start = True",
               "train.checkpoint_every = 0")
    fit(run)
    history = read_metrics(tmp_path / "r")
    assert [s for s, _ in history[keys.PSNR]] == [0, 2, 4]
    assert [s for s, _ in history["eval/floor/mean_colour/psnr"]] == [0]
    assert [s for s, _ in history[keys.HELDOUT_LOSS]] == [0, 2, 4]
    assert [s for s, _ in history[keys.TRAIN_FLOPS_PER_STEP]] == [0] and history[keys.PARAM_COUNT][0][1] > 0


# --- reports and the summary --------------------------------------------------------------------


def _record(weight, seed, psnr_final, floors=(15.6, 14.3, 18.7), flops=None, every=100, extra=None):
    from cameo_bench.tracking import RunRecord

    params = {"backbone.name": "mv_dit", "backbone.preset": "micro", "cameo.weight": str(weight),
              "cameo.layer": "depth:0.5", "cameo.source": "depth", "cameo.head": "mean", "seed": str(seed),
              "data.azimuth_step_deg": "30.0", "name": f"r{weight}{seed}", "train.steps": "400"}
    m = {keys.PSNR: [(s, 12.0 + (psnr_final - 12.0) * s / 400) for s in range(0, 401, every)],
         keys.SSIM: [(0, 0.1), (400, 0.3)],
         "eval/psnr/30-60": [(0, 12.0), (400, psnr_final)]}
    for name, value in zip(keys.FLOOR_PREDICTORS + (keys.ORACLE_DEPTH_WARP,), floors):
        key = keys.oracle_metric if name == keys.ORACLE_DEPTH_WARP else keys.floor_metric
        m[key(name, "psnr")] = [(0, value)]
        m[key(name, "ssim")] = [(0, value / 100)]
        m[key(name, "psnr/30-60")] = [(0, value + 0.5)]
    if flops is not None:
        m[keys.TRAIN_FLOPS_PER_STEP] = [(0, flops)]
    m.update(extra or {})
    return RunRecord(f"id{weight}{seed}", params["name"], params, {}, m)


def test_report_shows_floor_rows_and_marks_variants_that_do_not_beat_the_best_floor(tmp_path):
    from cameo_bench.report import build_report

    # baseline ends at 16.2 dB: above the best floor (15.6) but not by 1 dB; CAMEO ends at 17.0
    runs = [_record(w, s, p + 0.1 * s) for s in range(2) for w, p in ((0.0, 16.2), (0.5, 17.0))]
    build_report(runs, tmp_path / "r", experiment="r", n_boot=20, draw=False)
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## Floors and ceiling" in md
    assert "| floor: mean colour | 15.600 | 0.156 |" in md and "| oracle: depth warp | 18.700 | 0.187 |" in md
    assert "- **not synthesising**: baseline, final PSNR 16.25 dB (+0.65 dB to the best floor, mean colour 15.60 dB)" in md
    assert "not synthesising**: cameo" not in md
    sweep = md.split("## Sweep tables")[1].split("\n## ")[0]
    assert "+0.65 dB: **not synthesising** (best floor mean colour 15.60 dB)" in sweep and "| +1.45 dB |" in sweep
    assert "| floor: copy nearest | — | 14.300 | 0.143 | — | — |" in sweep  # seeds, PSNR, SSIM, speed-up, margin
    assert "| floor: mean colour | 16.100 |" in md  # the 30-60 bin's floor in the quality-by-bin table


def test_floor_rows_are_labelled_per_evaluation_set_when_the_data_differ():
    from cameo_bench.report import floors as RF

    groups = [("a", [_record(0.0, 0, 16.0).metrics]), ("b", [_record(0.5, 0, 16.0).metrics]),
              ("c", [_record(0.0, 1, 16.0, floors=(15.0, 16.5, 19.0)).metrics])]
    sets = RF.floor_sets(groups, [keys.PSNR])
    assert [labels for labels, _ in sets] == [["a", "b"], ["c"]]
    labels = [label for label, _, _ in RF.row_labels(sets)]
    assert labels[0] == "floor: mean colour (a and 1 more)" and "floor: copy nearest (c)" in labels
    # which floor is best depends on the data: copy nearest in the second set
    assert RF.best_floor(sets[1][1][keys.PSNR]) == (keys.FLOOR_COPY_NEAREST, 16.5)
    assert RF.verdict_cell(17.0, sets[1][1][keys.PSNR]).startswith("+0.50 dB: **not synthesising** (best floor copy")


def test_curves_are_drawn_with_floor_lines(tmp_path, monkeypatch):
    from cameo_bench.report import build_report, plots

    drawn = {}
    original = plots.convergence

    def spy(panels, metric, path, **kwargs):
        drawn[metric] = kwargs
        return original(panels, metric, path, **kwargs)

    monkeypatch.setattr(plots, "convergence", spy)
    runs = [_record(w, s, 17.0) for s in range(2) for w in (0.0, 0.5)]
    build_report(runs, tmp_path / "r", experiment="r", n_boot=10, draw=True)
    lines = drawn[keys.PSNR]["floors"]["mv_dit/micro"]
    assert [(name, value) for _, name, value in lines] == [("mean_colour", 15.6), ("copy_nearest", 14.3),
                                                           ("depth_warp", 18.7)]
    assert [v for _, _, v in drawn[keys.SSIM]["floors"]["mv_dit/micro"]] == pytest.approx([0.156, 0.143, 0.187])
    assert (tmp_path / "r" / "curves_eval_psnr.png").exists()


def test_report_against_flops_divides_the_step_speedup_by_the_cost_ratio(tmp_path):
    """CAMEO reaches every PSNR in half the steps (its curve is the baseline's at twice the step)
    but costs twice the FLOPs per step: against FLOPs the speed-up is exactly 1."""
    from cameo_bench.report import build_report

    def curve(speed, every):  # CAMEO evaluated twice as often: its piecewise-linear curve is exactly the baseline's
        return [(s, 12.0 + 4.0 * (1 - math.exp(-s * speed / 200))) for s in range(0, 401, every)]

    runs = []
    for s in range(2):
        runs.append(_record(0.0, s, 16.0, flops=1e12, extra={keys.PSNR: curve(1.0, 50)}))
        runs.append(_record(0.5, s, 16.0, flops=2e12, extra={keys.PSNR: curve(2.0, 25)}))
    by_steps = build_report(runs, tmp_path / "s", experiment="s", n_boot=10, draw=False, metrics=(keys.PSNR,))
    by_flops = build_report(runs, tmp_path / "f", experiment="f", n_boot=10, draw=False, metrics=(keys.PSNR,), x="flops")
    assert by_steps.comparison("cameo", keys.PSNR).speedup == pytest.approx([2.0] * 4, rel=1e-6)
    assert by_flops.comparison("cameo", keys.PSNR).speedup == pytest.approx([1.0] * 4, rel=1e-6)
    assert "**x axis: training TFLOP" in (tmp_path / "f" / "report.md").read_text()
    with pytest.raises(ValueError, match="compute/train_flops_per_step"):
        build_report([_record(0.0, 0, 16.0), _record(0.5, 0, 16.0)], tmp_path / "n", experiment="n", draw=False, x="flops")


def test_seconds_axis_interpolates_the_training_clock():
    from cameo_bench.report import xaxis

    run = _record(0.0, 0, 16.0, extra={keys.TRAIN_SECONDS: [(10, 5.0), (20, 12.0)]})
    assert xaxis.rescaler("seconds")(run, [(0, 1.0), (5, 2.0), (15, 3.0), (20, 4.0)]) == [
        (0.0, 1.0), (2.5, 2.0), (8.5, 3.0), (12.0, 4.0)]


def test_summary_prints_floor_rows_and_each_trials_margin_over_the_best_floor(tmp_path):
    import json

    from cameo_bench import sweep
    from cameo_bench.report.summary import summary_table

    spec = sweep.SweepSpec(name="qs", base=["gin/experiments/smoke.gin"], output_dir=str(tmp_path),
                           axes={"cameo.weight": [0.0, 0.5]})
    plan = sweep.plan(spec, check=False)
    for trial, psnr in zip(plan.trials, (15.9, 17.2)):
        folder = plan.run_root / trial.id
        folder.mkdir(parents=True)
        rows = [(4, keys.PSNR, psnr), (0, "eval/floor/mean_colour/psnr", 15.63), (0, "eval/floor/copy_nearest/psnr", 14.29),
                (0, "eval/floor/mean_colour/ssim", 0.225), (0, "eval/oracle/depth_warp/psnr", 18.68),
                (0, keys.TRAIN_FLOPS_PER_STEP, 5.0e9)]
        (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "key": k, "value": v}) + "\n"
                                                      for s, k, v in rows))
    lines = summary_table(plan).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {cells[0]: cells for line in lines[2:] if (cells := [c.strip() for c in line.strip("|").split("|")])}
    assert rows["floor: mean colour"][header.index("PSNR")] == "15.63"
    assert rows["floor: mean colour"][header.index("SSIM")] == "0.225"
    assert rows["floor: copy nearest"][header.index("SSIM")] == "-"
    assert rows["oracle: depth warp"][header.index("PSNR")] == "18.68"
    trials = [r for name, r in rows.items() if not name.startswith(("floor", "oracle"))]
    margins = sorted(r[header.index("PSNR − best floor")] for r in trials)
    assert margins == ["+0.27 dB: **not synthesising** (best floor mean colour 15.63 dB)", "+1.57 dB"]
    assert all(r[header.index("FLOPs/step")] == "5e+09" for r in trials)
