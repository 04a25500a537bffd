"""The single-view prior -> multi-view fine-tune path: scenes without references, the objective and
evaluation on them, a camera-inert run, its pretrained folder, and the DiT / SD layouts it is written in.

References are independent of the code under test: DiT's forward written out from the paper
(tests/test_pretrained_dit.py), the stock diffusers `UNet2DConditionModel`, and the v-target formula.
"""
from __future__ import annotations

import pathlib

import pytest
import torch
from diffusers import UNet2DConditionModel
from test_pretrained_dit import dit_forward

from backbones import create_backbone
from backbones import export_layouts
from cameo_bench import config
from cameo_bench.config import spec
from cameo_bench.data.synthetic import SyntheticScenes
from cameo_bench.engine.build import build_run
from cameo_bench.engine.loop import fit
from cameo_bench.engine.pretrained import PretrainedError
from cameo_bench.evaluation.evaluate import evaluate
from cameo_bench.objectives.diffusion import MultiViewDiffusion
from cameo_bench.tracking import keys

REPO = pathlib.Path(__file__).resolve().parents[1]
SMOKE = REPO / "gin/experiments/smoke.gin"
PRIOR = ["data.num_views = 1", "data.num_ref = 0", "cameo.weight = 0.0"]


def smoke(tmp_path, *bindings):
    return config.parse([SMOKE], [f"run_experiment.output_dir = '{tmp_path}'", "train.progress = False", *bindings])


def randomise(model, seed=0, std=0.1):
    """Non-zero weights everywhere (adaLN-Zero / zero output convs would make every check trivial)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def cameras(B, V, size, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c2w = torch.eye(4).repeat(B, V, 1, 1)
    c2w[..., :3, 3] = torch.randn(B, V, 3, generator=gen)
    K = torch.tensor([[1.2 * size, 0, (size - 1) / 2], [0, 1.2 * size, (size - 1) / 2], [0, 0, 1.0]])
    mask = (torch.rand(B, V, generator=gen) > 0.5).float()
    return dict(cam2world=c2w, intrinsics=K.expand(B, V, 3, 3).clone(), cond_mask=mask)


def run_model(model, x, t, seed=0):  # x [B, V, C, H, W]
    with torch.no_grad():
        return model(x, t, **cameras(x.shape[0], x.shape[1], x.shape[-1], seed)).sample


# ---- data and objective without references ------------------------------------------------------
def test_single_view_scenes_have_no_reference():
    ds = SyntheticScenes(3, 1, 16, 20.0, seed=0, num_ref=0)
    item = ds[1]
    assert item["image"].shape == (1, 3, 16, 16) and item["num_ref"] == 0
    with pytest.raises(ValueError, match="0 <= num_ref < num_views"):
        SyntheticScenes(3, 1, 16, 20.0, seed=0, num_ref=1)


class _Echo:
    """A model that records its inputs and predicts a fixed tensor."""

    def __init__(self, out):
        self.out, self.seen = out, {}

    def __call__(self, x_t, t, **kw):
        self.seen = dict(x_t=x_t, t=t, **kw)
        return type("Out", (), {"sample": self.out, "tap": None})()


def test_objective_without_references_noises_and_scores_every_view():
    gen = torch.Generator().manual_seed(0)
    B, V = 2, 3
    image = torch.rand(B, V, 3, 8, 8, generator=gen)
    K = torch.tensor([[8.0, 0, 3.5], [0, 8.0, 3.5], [0, 0, 1]]).expand(B, V, 3, 3)
    batch = dict(image=image, intrinsics=K, cam2world=torch.eye(4).expand(B, V, 4, 4), num_ref=0)
    diffusion = MultiViewDiffusion(beta_schedule="squaredcos_cap_v2")
    pred = torch.randn(B, V, 3, 8, 8, generator=gen)
    noise = torch.randn(B, V, 3, 8, 8, generator=gen)
    t = torch.tensor([100, 700])
    model = _Echo(pred)
    loss, aux = diffusion.training_loss(model, batch, t=t, camera_drop=torch.zeros(B, dtype=torch.bool), noise=noise)
    a = diffusion.alphas_cumprod[t].reshape(B, 1, 1, 1, 1)
    x0 = 2 * image - 1
    v = a.sqrt() * noise - (1 - a).sqrt() * x0  # the v target, by its definition
    assert torch.equal(model.seen["cond_mask"], torch.ones(B, V))  # every view is a target
    torch.testing.assert_close(model.seen["x_t"], a.sqrt() * x0 + (1 - a).sqrt() * noise)  # no view kept clean
    torch.testing.assert_close(loss, (pred - v).pow(2).mean())


def test_sampler_without_references_generates_every_view():
    B, V = 2, 1
    batch = dict(image=torch.rand(B, V, 3, 8, 8), intrinsics=torch.eye(3).expand(B, V, 3, 3),
                 cam2world=torch.eye(4).expand(B, V, 4, 4), num_ref=0)
    model = _Echo(torch.zeros(B, V, 3, 8, 8))
    out = [MultiViewDiffusion().sample(model, batch, num_steps=4, guidance_scale=1.0,
                                       generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    assert out[0].shape == batch["image"].shape and not torch.equal(out[0], batch["image"])
    assert not torch.equal(out[0], out[1])  # the views come from the noise, not from a reference


def test_evaluation_without_references_leaves_out_what_needs_them_and_says_why():
    model = randomise(create_backbone("mv_dit", "micro", sample_size=16), std=0.02).eval()
    ds = SyntheticScenes(2, 1, 16, 20.0, seed=5, num_ref=0)
    batch = {k: (torch.stack([ds[i][k] for i in range(2)]) if torch.is_tensor(ds[0][k]) else 0) for k in ds[0]}
    eval_spec = spec.EvalSpec(sampler_steps=2, lpips=False, convergence_timesteps=4)
    omitted = {}
    out = evaluate(model, MultiViewDiffusion(), [batch], eval_spec, omitted=omitted)
    assert keys.HELDOUT_LOSS in out and keys.at_timestep(keys.X0_PSNR, 500) in out
    assert not [k for k in out if k.startswith((keys.PSNR, keys.SSIM, keys.FLOOR, keys.ORACLE, keys.ATTN))]
    for name in (keys.PSNR, keys.SSIM, keys.FLOOR, keys.ORACLE, keys.CONSISTENCY):
        assert "num_ref = 0" in omitted[name]
    assert "2 or more views" in omitted[keys.ATTN]


# ---- a prior run: camera-inert, its pretrained folder, the fine-tune start ---------------------------
def test_prior_run_writes_its_ema_weights_and_a_multi_view_run_starts_from_them(tmp_path):
    exp = smoke(tmp_path, *PRIOR, "optim.ema_decay = 0.9", "train.save_pretrained = True", "train.camera_inert = True",
                "eval.every = 0", "optim.lr = 1e-2")
    run = build_run(exp)
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    fit(run)
    folder = tmp_path / "smoke" / "pretrained"
    assert (folder / "config.json").is_file() and not list(tmp_path.glob("smoke/.pretrained*"))
    camera = run.model.patch_embed.proj.weight[:, 3:]
    assert camera.abs().max() == 0  # camera_inert: zero from the start and through training
    assert not torch.equal(before["patch_embed.proj.weight"][:, :3], run.model.patch_embed.proj.weight[:, :3])

    loaded = create_backbone("mv_dit", init_from=str(folder)).eval()
    ema = run.ema.module.eval()
    for name, value in ema.state_dict().items():  # the EMA's weights, not the raw ones
        torch.testing.assert_close(loaded.state_dict()[name], value, atol=0, rtol=0)
    x, t = torch.randn(2, 1, 3, 16, 16), torch.tensor([10, 900])
    torch.testing.assert_close(run_model(loaded, x, t), run_model(ema, x, t))

    finetune = smoke(tmp_path / "ft", f"backbone.init_from = '{folder}'", "train.steps = 0", "eval.every = 0")
    model = build_run(finetune).model.eval()  # a 3-view run: the prior per view, cameras still inert
    x3 = torch.randn(2, 3, 3, 16, 16)
    torch.testing.assert_close(run_model(model, x3[:, :1], t), run_model(ema, x3[:, :1], t), atol=1e-6, rtol=1e-5)
    assert run_model(model, x3, t, seed=1).shape == x3.shape


def test_a_layout_the_model_cannot_be_written_in_fails_before_training(tmp_path):
    exp = smoke(tmp_path, *PRIOR, "train.save_pretrained = True", "train.pretrained_layouts = ['dit']")
    with pytest.raises(PretrainedError, match="qk_norm=True.*camera path|camera path.*qk_norm"):
        fit(build_run(exp))
    assert not (tmp_path / "smoke" / "checkpoints").exists()
    with pytest.raises(config.ConfigError, match="save_pretrained"):
        smoke(tmp_path, "train.pretrained_layouts = ['dit']")


def test_camera_inert_prior_in_the_dit_layout(tmp_path):
    exp = smoke(tmp_path, *PRIOR, "train.save_pretrained = True", "train.camera_inert = True",
                "train.pretrained_layouts = ['dit']", "backbone.overrides = {'qk_norm': False}", "eval.every = 0")
    fit(build_run(exp))
    dit = tmp_path / "smoke" / "pretrained" / export_layouts.DIT_FILE
    saved = create_backbone("mv_dit", init_from=str(dit.parent)).eval()
    loaded = create_backbone("mv_dit", init_from=str(dit), num_heads=2).eval()
    x, t = torch.randn(2, 1, 3, 16, 16), torch.tensor([3, 600])
    torch.testing.assert_close(run_model(loaded, x, t), run_model(saved, x, t), atol=1e-6, rtol=1e-5)


# ---- the layouts against their stock models ------------------------------------------------------------
def exportable_dit(seed=0):
    model = randomise(create_backbone("mv_dit", "micro", qk_norm=False), seed)
    export_layouts.zero_camera_path(model)
    return model.eval()


def test_dit_layout_is_dit_with_the_null_class(tmp_path):
    model = exportable_dit()
    path = export_layouts.export(model, tmp_path, "dit")
    sd = torch.load(path, weights_only=True)
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([0, 250, 999])
    theirs = dit_forward(sd, x, t, torch.zeros(3, dtype=torch.long), num_heads=2)
    torch.testing.assert_close(run_model(model, x[:, None], t)[:, 0], theirs, atol=1e-5, rtol=1e-5)
    loaded = create_backbone("mv_dit", init_from=str(path), num_heads=2).eval()  # back through init_from
    x3 = torch.randn(2, 3, 3, 8, 8)
    torch.testing.assert_close(run_model(loaded, x3, t[:2]), run_model(model, x3, t[:2]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("injection", ["add", "concat"])
def test_sd_unet_layout_is_a_stock_unet(tmp_path, injection):
    model = randomise(create_backbone("mv_unet", "micro", qk_norm=False, camera_injection=injection), std=0.05)
    export_layouts.zero_camera_path(model)
    model.eval()
    folder = export_layouts.export(model, tmp_path, "sd_unet")
    stock = UNet2DConditionModel.from_pretrained(folder).eval()  # no missing or unexpected keys
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 800])
    text = torch.randn(2, 4, stock.config.cross_attention_dim)  # any text: its attention adds 0
    with torch.no_grad():
        theirs = stock(x, t, encoder_hidden_states=text).sample
    torch.testing.assert_close(run_model(model, x[:, None], t)[:, 0], theirs, atol=1e-5, rtol=1e-4)
    loaded = create_backbone("mv_unet", "micro", init_from=str(folder), qk_norm=False,
                             camera_injection=injection).eval()
    x3 = torch.randn(2, 2, 3, 16, 16)
    torch.testing.assert_close(run_model(loaded, x3, t), run_model(model, x3, t), atol=1e-5, rtol=1e-4)


def test_what_a_layout_cannot_hold_is_named():
    with pytest.raises(export_layouts.NotExportableError, match="qk_norm=True"):
        export_layouts.check_exportable(create_backbone("mv_dit", "micro"), "dit")
    live = randomise(create_backbone("mv_dit", "micro", qk_norm=False))
    with pytest.raises(export_layouts.NotExportableError, match="camera path is not zero"):
        export_layouts.check_exportable(live, "dit")
    patched = create_backbone("mv_unet", "micro", qk_norm=False, input_patch=2)
    with pytest.raises(export_layouts.NotExportableError, match="input_patch=2"):
        export_layouts.check_exportable(patched, "sd_unet")
    with pytest.raises(export_layouts.NotExportableError, match="mv_unet"):
        export_layouts.check_exportable(exportable_dit(), "sd_unet")


def test_layout_names_agree_with_the_spec():
    assert tuple(export_layouts.LAYOUTS) == spec.PRETRAINED_LAYOUTS


def test_cameo_on_single_views_is_refused_in_the_spec(tmp_path):
    with pytest.raises(config.ConfigError, match="data.num_views"):
        smoke(tmp_path, "data.num_views = 1", "data.num_ref = 0", "cameo.weight = 0.5")


def test_cameras_added_at_attention_sites_count_as_camera_path():
    """`camera_levels` adds cameras at every attention site: a live one blocks the SD layout, and
    zero_camera_path + freeze_camera_path (train.camera_inert) cover it."""
    model = create_backbone("mv_unet", "micro", qk_norm=False, camera_levels="attention")
    export_layouts.check_exportable(model, "sd_unet")  # zero-initialised: exportable as built
    (key, first), *_ = model.level_cameras.items()
    with torch.no_grad():
        first.out.weight.normal_()
    with pytest.raises(export_layouts.NotExportableError, match=f"level_cameras.{key}.out.weight"):
        export_layouts.check_exportable(model, "sd_unet")
    export_layouts.zero_camera_path(model)
    export_layouts.freeze_camera_path(model)
    export_layouts.check_exportable(model, "sd_unet")
    assert not any(p.requires_grad for e in model.level_cameras.values() for p in e.out.parameters())
