"""Diffusion objective and DDIM sampler, checked against hand-written schedules and oracle models.

The reference schedule below is written from the formulas (SD scaled-linear / GLIDE cosine / DDPM
and DiT linear 1e-4..0.02, SNR division, Lin et al. 2023 Algorithm 1) in float64 numpy, without diffusers.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from backbones.interface import BackboneOutput
from cameo_bench.objectives.diffusion import MultiViewDiffusion

T = 1000
B, V, H, W = 2, 3, 4, 5


def naive_alphas_cumprod(schedule="scaled_linear", shift=1.0, zero_terminal=False, steps=T) -> np.ndarray:
    if schedule == "scaled_linear":
        betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), steps) ** 2
    elif schedule == "linear":  # DDPM (Ho et al. 2020) and DiT: linear in beta from 1e-4 to 0.02
        betas = np.linspace(1e-4, 0.02, steps)
    else:  # GLIDE cosine, betas clipped at 0.999
        f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = np.array([min(1 - f((i + 1) / steps) / f(i / steps), 0.999) for i in range(steps)])
    a = np.cumprod(1.0 - betas)
    snr = a / (1 - a) / shift
    a = snr / (1 + snr)
    if zero_terminal:
        r = np.sqrt(a)
        r = (r - r[-1]) * r[0] / (r[0] - r[-1])
        a = r**2
    return a


def make_batch(num_ref=1, seed=0, b=B, v=V, h=H, w=W):
    g = torch.Generator().manual_seed(seed)
    c2w = torch.eye(4).repeat(b, v, 1, 1)
    c2w[..., :3, 3] = torch.randn(b, v, 3, generator=g)
    K = torch.tensor([[7.0, 0, 2.0], [0, 6.0, 1.5], [0, 0, 1]]).repeat(b, v, 1, 1)
    return dict(image=torch.rand(b, v, 3, h, w, generator=g), intrinsics=K, cam2world=c2w, num_ref=num_ref)


class Recorder(nn.Module):
    """Returns a fixed output and remembers what it was called with."""

    def __init__(self, output=None):
        super().__init__()
        self.output, self.calls = output, []

    def forward(self, x_t, t, *, cam2world, intrinsics, cond_mask, tap=None, perturb=None):
        self.calls.append(dict(x_t=x_t.clone(), t=t.clone(), cam2world=cam2world.clone(),
                               intrinsics=intrinsics.clone(), cond_mask=cond_mask.clone(), tap=tap))
        out = torch.zeros_like(x_t) if self.output is None else self.output
        return BackboneOutput(sample=out, tap=tap)


class Oracle(nn.Module):
    """Knows the clean x0 and the schedule, so it returns the exact v (or eps) for any x_t.
    Ignores cameras; checks that references arrive clean at every call."""

    def __init__(self, x0, alphas_cumprod, prediction_type, num_ref):
        super().__init__()
        self.x0, self.a = x0.double(), torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.prediction_type, self.num_ref, self.calls = prediction_type, num_ref, 0

    def forward(self, x_t, t, *, cam2world, intrinsics, cond_mask, tap=None, perturb=None):
        self.calls += 1
        reps = x_t.shape[0] // self.x0.shape[0]
        x0 = self.x0.repeat(reps, 1, 1, 1, 1)
        assert torch.equal(x_t[:, : self.num_ref].double(), x0[:, : self.num_ref].float().double())
        assert torch.equal(cond_mask[:, : self.num_ref], torch.zeros_like(cond_mask[:, : self.num_ref]))
        assert torch.equal(cond_mask[:, self.num_ref:], torch.ones_like(cond_mask[:, self.num_ref:]))
        a = self.a[t][:, None, None, None, None]
        eps = (x_t.double() - a.sqrt() * x0) / (1 - a).sqrt()
        out = eps if self.prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
        return BackboneOutput(sample=out.float())


@pytest.mark.parametrize("schedule", ["scaled_linear", "squaredcos_cap_v2", "linear"])
@pytest.mark.parametrize("shift", [1.0, 4.0])
def test_schedule_matches_formulas_and_shift_divides_snr(schedule, shift):
    diff = MultiViewDiffusion(beta_schedule=schedule, snr_shift=shift)
    a_ref = naive_alphas_cumprod(schedule, shift)
    np.testing.assert_allclose(diff.alphas_cumprod.double().numpy(), a_ref, rtol=2e-4, atol=1e-7)
    base = naive_alphas_cumprod(schedule, 1.0)
    snr = diff.snr().numpy()
    np.testing.assert_allclose(snr[:-1], base[:-1] / (1 - base[:-1]) / shift, rtol=2e-3)


def test_zero_terminal_snr_and_finite_v_loss_at_last_step():
    diff = MultiViewDiffusion(snr_shift=4.0, rescale_zero_terminal_snr=True)
    assert diff.alphas_cumprod[-1].item() == 0.0 and diff.snr()[-1].item() == 0.0
    np.testing.assert_allclose(diff.alphas_cumprod.double().numpy(),
                               naive_alphas_cumprod("scaled_linear", 4.0, zero_terminal=True), rtol=2e-4, atol=1e-7)
    # x_t is pure noise at T-1: the v target is -x0, the loss must stay finite with gradients.
    w = nn.Parameter(torch.tensor(0.5))
    model = Recorder()
    model.forward = lambda x_t, t, **kw: BackboneOutput(sample=w * x_t)
    batch = make_batch()
    loss, _ = diff.training_loss(model, batch, t=torch.full((B,), T - 1), generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(w.grad)


def test_objective_is_built_from_the_one_diffusion_spec():
    """`DiffusionSpec` is the only definition: gin builds it, the objective takes it or its fields."""
    import dataclasses

    from cameo_bench import config
    from cameo_bench.config.spec import DiffusionSpec
    from cameo_bench.objectives import diffusion as module

    assert not hasattr(module, "DiffusionConfig")
    spec = DiffusionSpec(snr_shift=4.0, rescale_zero_terminal_snr=True)
    from_spec, from_values = MultiViewDiffusion(spec), MultiViewDiffusion(snr_shift=4.0, rescale_zero_terminal_snr=True)
    assert from_spec.config is spec and from_values.config == spec
    assert torch.equal(from_spec.betas, from_values.betas)
    np.testing.assert_allclose(from_spec.alphas_cumprod.double().numpy(),
                               naive_alphas_cumprod("scaled_linear", 4.0, zero_terminal=True), rtol=2e-4, atol=1e-7)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.snr_shift = 2.0  # the betas were derived from it once
    with pytest.raises(TypeError, match="not both"):
        MultiViewDiffusion(spec, snr_shift=2.0)
    with pytest.raises(TypeError, match="DiffusionSpec"):
        MultiViewDiffusion({"snr_shift": 2.0})
    exp = config.parse(["gin/experiments/smoke.gin"], ["diffusion.snr_shift = 4.0"])
    assert isinstance(exp.diffusion, DiffusionSpec) and MultiViewDiffusion(exp.diffusion).config.snr_shift == 4.0


def test_epsilon_with_zero_terminal_snr_is_refused():
    with pytest.raises(ValueError, match="v_prediction"):
        MultiViewDiffusion(prediction_type="epsilon", rescale_zero_terminal_snr=True)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_noising_and_target_by_hand(prediction_type):
    diff = MultiViewDiffusion(prediction_type=prediction_type, snr_shift=4.0)
    batch = make_batch(num_ref=1)
    t = torch.tensor([17, 640])
    out = torch.randn(B, V, 3, H, W, generator=torch.Generator().manual_seed(5))
    model = Recorder(output=out)
    loss, aux = diff.training_loss(model, batch, t=t, generator=torch.Generator().manual_seed(3))

    # Documented draw order with t given: camera drop [B], then noise.
    g = torch.Generator().manual_seed(3)
    torch.rand(B, generator=g)
    noise = torch.randn(B, V, 3, H, W, generator=g).double()
    x0 = 2 * batch["image"].double() - 1
    a = torch.from_numpy(naive_alphas_cumprod("scaled_linear", 4.0))[t][:, None, None, None, None]
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    torch.testing.assert_close(model.calls[0]["x_t"][:, 1:].double(), x_t[:, 1:], rtol=0, atol=1e-5)
    assert torch.equal(model.calls[0]["t"], t)
    target = noise if prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
    expected = ((out.double() - target)[:, 1:] ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert aux["loss_per_sample"].shape == (B,)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_min_snr_gamma_weighs_each_sample_as_diffusers_training_scripts_do(prediction_type):
    from diffusers.training_utils import compute_snr

    gamma, t = 5.0, torch.tensor([3, 700])  # SNR ~ 300 (weight capped) and ~ 0.1 (below gamma)
    plain = MultiViewDiffusion(prediction_type=prediction_type)
    weighted = MultiViewDiffusion(prediction_type=prediction_type, min_snr_gamma=gamma)
    batch, out = make_batch(num_ref=1), torch.randn(B, V, 3, H, W, generator=torch.Generator().manual_seed(2))

    def run(diff, **kw):
        return diff.training_loss(Recorder(out), batch, t=t, generator=torch.Generator().manual_seed(4), **kw)

    loss, aux = run(weighted)
    snr = compute_snr(weighted.scheduler, t)  # diffusers' train_text_to_image.py, --snr_gamma
    w = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    w = w / snr if prediction_type == "epsilon" else w / (snr + 1)
    per_sample = run(plain)[1]["loss_per_sample"]  # the MSE of each sample over its target views
    assert loss.item() == pytest.approx((per_sample * w).mean().item(), rel=1e-5)
    assert w[0] < 0.1 and torch.equal(aux["loss_per_sample"], per_sample)  # the per-sample record is unweighted
    assert run(weighted, weigh_timesteps=False)[0].item() == pytest.approx(run(plain)[0].item(), rel=1e-6)


def test_references_stay_clean_and_cond_mask():
    diff = MultiViewDiffusion()
    batch = make_batch(num_ref=torch.tensor([1, 2]))  # per-sample, as a DataLoader would collate it
    model = Recorder()
    _, aux = diff.training_loss(model, batch, generator=torch.Generator().manual_seed(0))
    x_t, x0 = model.calls[0]["x_t"], 2 * batch["image"] - 1
    assert torch.equal(x_t[0, :1], x0[0, :1]) and torch.equal(x_t[1, :2], x0[1, :2])
    assert not torch.allclose(x_t[0, 1:], x0[0, 1:]) and not torch.allclose(x_t[1, 2:], x0[1, 2:])
    expected_mask = torch.tensor([[0.0, 1, 1], [0, 0, 1]])
    assert torch.equal(model.calls[0]["cond_mask"], expected_mask) and torch.equal(aux["cond_mask"], expected_mask)


def test_loss_ignores_reference_outputs_only():
    diff = MultiViewDiffusion()
    batch = make_batch(num_ref=1)
    out = torch.randn(B, V, 3, H, W)
    loss_of = lambda o: diff.training_loss(Recorder(o), batch, t=torch.tensor([3, 900]),  # noqa: E731
                                           generator=torch.Generator().manual_seed(1))[0]
    base = loss_of(out)
    changed_ref = out.clone()
    changed_ref[:, 0] += 100 * torch.randn(B, 3, H, W)
    changed_target = out.clone()
    changed_target[:, 2] += 1.0
    assert loss_of(changed_ref).item() == base.item()
    assert loss_of(changed_target).item() != pytest.approx(base.item())


def test_camera_dropout_rate_and_canonical_cameras():
    rate, n, h, w = 0.1, 4000, 2, 3
    diff = MultiViewDiffusion(camera_dropout=rate)
    batch = make_batch(b=n, v=2, h=h, w=w)
    model = Recorder()
    _, aux = diff.training_loss(model, batch, generator=torch.Generator().manual_seed(0))
    drop = aux["camera_dropped"]
    assert drop.dtype == torch.bool and abs(drop.float().mean().item() - rate) < 0.015  # 3 sigma
    call = model.calls[0]
    K0 = torch.tensor([[3.0, 0, 1.0], [0, 3.0, 0.5], [0, 0, 1]])  # f = max(H, W), centre ((W-1)/2, (H-1)/2)
    assert torch.equal(call["intrinsics"][drop], K0.expand(int(drop.sum()), 2, 3, 3))
    assert torch.equal(call["cam2world"][drop], torch.eye(4).expand(int(drop.sum()), 2, 4, 4))
    assert torch.equal(call["intrinsics"][~drop], batch["intrinsics"][~drop])
    assert torch.equal(call["cam2world"][~drop], batch["cam2world"][~drop])


ORACLE_CASES = [
    dict(prediction_type="v_prediction", beta_schedule="scaled_linear", snr_shift=4.0, rescale_zero_terminal_snr=True),
    dict(prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2"),
    dict(prediction_type="epsilon", beta_schedule="scaled_linear", snr_shift=2.0),
]


@pytest.mark.parametrize("case", ORACLE_CASES, ids=lambda c: f"{c['prediction_type']}-{c['beta_schedule']}")
@pytest.mark.parametrize("steps,eta", [(50, 0.0), (7, 1.0)])
def test_ddim_with_oracle_reconstructs_targets(case, steps, eta):
    diff = MultiViewDiffusion(**case)
    batch = make_batch(num_ref=1)
    truth = batch["image"].clone()
    batch["image"][:, 1:] = 0.5  # the sampler must not see the true targets
    a = naive_alphas_cumprod(case["beta_schedule"], case.get("snr_shift", 1.0),
                             case.get("rescale_zero_terminal_snr", False))
    oracle = Oracle(2 * truth - 1, a, case["prediction_type"], num_ref=1)
    images = diff.sample(oracle, batch, num_steps=steps, guidance_scale=2.0,
                         generator=torch.Generator().manual_seed(0), eta=eta)
    assert oracle.calls == steps
    assert (images[:, 1:] - truth[:, 1:]).abs().max().item() < 1e-3
    assert torch.equal(images[:, :1], truth[:, :1])


def test_guidance_one_and_two_agree_for_camera_blind_model():
    diff = MultiViewDiffusion(snr_shift=4.0, rescale_zero_terminal_snr=True)
    batch = make_batch()

    class Blind(nn.Module):  # not an oracle: a fixed nonlinear function of x_t and t
        def forward(self, x_t, t, **kw):
            return BackboneOutput(sample=torch.tanh(x_t) * (t[:, None, None, None, None] / T))

    run = lambda g: diff.sample(Blind(), batch, num_steps=5, guidance_scale=g,  # noqa: E731
                                generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(run(1.0), run(2.0), rtol=0, atol=1e-6)


def test_guidance_formula_and_batched_forward():
    # One DDIM step from t = T-1 with zero terminal SNR returns x0 = -v exactly.
    diff = MultiViewDiffusion(rescale_zero_terminal_snr=True)
    batch = make_batch(num_ref=1)
    calls = []

    class CameraAware(nn.Module):  # v = 0.2 with real cameras, -0.1 with the "no camera" input
        def forward(self, x_t, t, *, cam2world, intrinsics, cond_mask, **kw):
            calls.append(x_t.shape[0])
            dropped = (cam2world == torch.eye(4)).flatten(1).all(1)  # [N]
            v = torch.where(dropped, -0.1, 0.2)[:, None, None, None, None]
            return BackboneOutput(sample=v.expand_as(x_t).clone())

    out = diff.sample(CameraAware(), batch, num_steps=1, guidance_scale=2.0, generator=torch.Generator())
    # v = -0.1 + 2 (0.2 + 0.1) = 0.5 -> x0 = -0.5 -> image 0.25
    torch.testing.assert_close(out[:, 1:], torch.full_like(out[:, 1:], 0.25))
    assert calls == [2 * B]
    calls.clear()
    out = diff.sample(CameraAware(), batch, num_steps=1, guidance_scale=1.0, generator=torch.Generator())
    torch.testing.assert_close(out[:, 1:], torch.full_like(out[:, 1:], 0.4))  # x0 = -0.2
    assert calls == [B]


def test_deterministic_given_generator():
    diff = MultiViewDiffusion(snr_shift=4.0, rescale_zero_terminal_snr=True, camera_dropout=0.5)
    batch = make_batch()
    out = torch.randn(B, V, 3, H, W)

    def loss(seed):
        model = Recorder(out)
        value, aux = diff.training_loss(model, batch, generator=torch.Generator().manual_seed(seed))
        return value, aux["t"], model.calls[0]["x_t"]

    for a, b in zip(loss(7), loss(7)):
        assert torch.equal(a, b)
    assert not torch.equal(loss(7)[2], loss(8)[2])

    def sample(seed):
        model = lambda x_t, t, **kw: BackboneOutput(sample=0.3 * x_t)  # noqa: E731
        return diff.sample(model, batch, num_steps=4, eta=1.0, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(1), sample(1)) and not torch.equal(sample(1), sample(2))


def test_bad_inputs_name_the_problem():
    diff = MultiViewDiffusion()
    batch = make_batch()
    with pytest.raises(KeyError, match="cam2world"):
        diff.training_loss(Recorder(), {k: v for k, v in batch.items() if k != "cam2world"})
    with pytest.raises(ValueError, match="intrinsics"):
        diff.training_loss(Recorder(), {**batch, "intrinsics": batch["intrinsics"][:, :2]})
    with pytest.raises(ValueError, match="num_ref"):
        diff.training_loss(Recorder(), {**batch, "num_ref": V})
    with pytest.raises(ValueError, match="beta_schedule"):
        MultiViewDiffusion(beta_schedule="cosine")
    with pytest.raises(ValueError, match="camera_dropout"):
        MultiViewDiffusion(camera_dropout=1.5)
