"""Latent space: the VAE codec against stock diffusers, the model's grid (rescaled intrinsics, rays that
still meet, CAMEO targets at the image-pixel token stride), the backbone's channels from the codec,
`backbone.init_from` wired through the build, and the paper recipes' shrunk runs.

References are independent of the code under test: the stock `AutoencoderKL`, analytic geometry
(a 3D point must lie on the ray through its pixel), hand-computed intrinsics, and a pixel-space
model whose tokens have the same stride in image pixels.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib

import pytest
import torch
from diffusers import AutoencoderKL
from torch import nn

from backbones import create_backbone
from backbones.camera import plucker_rays
from backbones.interface import BackboneOutput
from cameo_bench import config
from cameo_bench.config.spec import BackboneSpec, CameoSpec, CodecSpec, DataSpec, EvalSpec, Experiment, TrainSpec
from cameo_bench.correspondence import compute_targets
from cameo_bench.engine import step
from cameo_bench.engine.build import ExperimentError, build_run
from cameo_bench.objectives.codecs import MICRO_VAE_CONFIG, PixelCodec, VaeCodec
from cameo_bench.objectives.diffusion import MultiViewDiffusion, model_intrinsics

REPO = pathlib.Path(__file__).resolve().parents[1]


def write_micro_vae(folder: pathlib.Path, **config) -> pathlib.Path:
    """A micro AutoencoderKL folder in diffusers' own layout: 4 blocks = 3 downsamplings (8x)."""
    torch.manual_seed(1)
    AutoencoderKL(**{**MICRO_VAE_CONFIG, **config}).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------
# codecs


def test_vae_codec_matches_stock_autoencoder_with_its_scaling_and_shift(tmp_path):
    folder = write_micro_vae(tmp_path / "vae", scaling_factor=0.5, shift_factor=0.1)
    stock = AutoencoderKL.from_pretrained(folder).eval()
    codec = VaeCodec.from_folder(folder, decode_batch=1, encode_batch=2)
    assert (codec.channels, codec.downsample, codec.scaling_factor, codec.shift_factor) == (4, 8, 0.5, 0.1)

    images = torch.rand(2, 3, 3, 32, 48)  # [B, V, 3, H, W]
    with torch.no_grad():
        mean = stock.encode(images.flatten(0, 1) * 2 - 1).latent_dist.mean  # [6, 4, 4, 6]
        expected = ((mean - 0.1) * 0.5).unflatten(0, (2, 3))
        decoded = stock.decode(expected.flatten(0, 1) / 0.5 + 0.1).sample
    latents = codec.encode(images)
    assert latents.shape == (2, 3, 4, 4, 6)
    torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-6)
    # decoding frame by frame (decode_batch = 1) is decoding all at once
    torch.testing.assert_close(codec.decode(latents), ((decoded + 1) / 2).clamp(0, 1).unflatten(0, (2, 3)),
                               rtol=1e-5, atol=1e-5)


def test_sd2_scaling_default_posterior_sample_and_bad_folders(tmp_path):
    folder = write_micro_vae(tmp_path / "vae")
    codec = VaeCodec.from_folder(tmp_path)  # an SD pipeline folder: its vae/ subfolder is found
    assert codec.scaling_factor == 0.18215 and codec.shift_factor == 0.0
    sampling = VaeCodec.from_folder(folder, sample=True)
    images = torch.rand(1, 2, 3, 16, 16)
    torch.manual_seed(0)
    a = sampling.encode(images)
    assert not torch.equal(a, sampling.encode(images))  # a fresh draw each time
    mean, std = codec.moments(images[0])
    torch.manual_seed(0)  # the same draw again: mean + std * eps, scaled
    torch.testing.assert_close(a[0], codec.scale(mean + std * torch.randn_like(std)))
    assert codec.identity() == VaeCodec.from_folder(folder).identity()
    with pytest.raises(ValueError, match="divisible by 8"):
        codec.encode(torch.rand(1, 2, 3, 12, 16))
    with pytest.raises(FileNotFoundError, match="config.json"):
        VaeCodec.from_folder(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------
# the model's grid


def test_intrinsics_rescaled_about_the_pixel_corner_origin():
    """512 px image, 64x64 latents (s = 1/8): f' = f / 8, c' = (c + 1/2) / 8 - 1/2."""
    K = torch.tensor([[400.0, 0.0, 255.5], [0.0, 410.0, 200.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    K8 = model_intrinsics(K, (512, 512), (64, 64))
    expected = torch.tensor([[50.0, 0.0, 31.5], [0.0, 51.25, 200.5 / 8 - 0.5], [0.0, 0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(K8, expected, rtol=0, atol=1e-12)
    assert model_intrinsics(K, (32, 32), (32, 32)) is K  # pixel space: untouched


class Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x_t, t, *, cam2world, intrinsics, cond_mask, tap=None, perturb=None):
        self.calls.append(dict(shape=tuple(x_t.shape), intrinsics=intrinsics.clone(), cam2world=cam2world.clone()))
        return BackboneOutput(sample=torch.zeros_like(x_t), tap=tap)


class EightX(PixelCodec):
    """A stand-in codec with SD's geometry (4 channels, 8x): only the grid matters here."""

    channels, downsample = 4, 8

    def encode(self, image):
        return torch.zeros(*image.shape[:2], 4, image.shape[-2] // 8, image.shape[-1] // 8, dtype=image.dtype)

    def decode(self, x):
        return torch.zeros(*x.shape[:2], 3, x.shape[-2] * 8, x.shape[-1] * 8, dtype=x.dtype)


def look_at(eye, target):
    eye, target = torch.as_tensor(eye, dtype=torch.float64), torch.as_tensor(target, dtype=torch.float64)
    z = (target - eye) / (target - eye).norm()
    x = torch.linalg.cross(torch.tensor([0.0, -1.0, 0.0], dtype=torch.float64), z)
    x = x / x.norm()
    c2w = torch.eye(4, dtype=torch.float64)
    c2w[:3, :3] = torch.stack([x, torch.linalg.cross(z, x), z], dim=1)
    c2w[:3, 3] = eye
    return c2w


@pytest.mark.parametrize("where", ["training_loss", "sample"])
def test_rays_through_corresponding_latent_pixels_meet(where):
    """A point X seen by two cameras at latent pixel centres (a, b) of each: the rays the model's
    raymaps give at those latent pixels pass through X (float64, < 1e-5). The image-pixel K used
    on the latent grid (the bug) misses by a wide margin."""
    H = W = 64  # image; latents 8x8
    X = torch.tensor([0.3, -0.2, 4.0], dtype=torch.float64)
    c2w = torch.stack([look_at([0.0, 0.0, 0.0], [0.1, 0.0, 4.0]), look_at([1.5, 0.2, 0.5], [0.0, 0.0, 4.0])])
    pixels = [(2, 5), (6, 1)]  # (row a, col b) on the 8x8 latent grid of each view
    K = []
    for c, (a, b) in zip(c2w, pixels):  # choose the principal point so that X lands on that latent pixel
        x_cam = torch.linalg.inv(c)[:3] @ torch.cat([X, X.new_ones(1)])
        u, v = 8 * (b + 0.5) - 0.5, 8 * (a + 0.5) - 0.5  # the latent pixel's centre in image pixels
        f = 70.0
        K.append(torch.tensor([[f, 0, u - f * x_cam[0] / x_cam[2]], [0, f, v - f * x_cam[1] / x_cam[2]], [0, 0, 1]],
                              dtype=torch.float64))
    batch = dict(image=torch.rand(1, 2, 3, H, W, dtype=torch.float64), intrinsics=torch.stack(K)[None],
                 cam2world=c2w[None], num_ref=1)
    model = Recorder()
    diffusion = MultiViewDiffusion(camera_dropout=0.0, codec=EightX())
    if where == "training_loss":
        diffusion.training_loss(model, batch, t=torch.tensor([10]))
    else:
        diffusion.sample(model, batch, num_steps=1, guidance_scale=1.0)
    call = model.calls[0]
    assert call["shape"] == (1, 2, 4, 8, 8)

    def miss(K_used):  # distance of X to each view's ray at its latent pixel: |X x d - m|
        rays = plucker_rays(K_used, call["cam2world"], 8, 8)[0]  # [V, 6, 8, 8]
        out = []
        for view, (a, b) in enumerate(pixels):
            d, m = rays[view, :3, a, b], rays[view, 3:, a, b]
            out.append(float((torch.linalg.cross(X, d) - m).norm()))
        return max(out)

    assert call["intrinsics"].dtype == torch.float64
    assert miss(call["intrinsics"]) < 1e-5
    assert miss(batch["intrinsics"]) > 0.1  # image-pixel K on the latent grid: the rays miss X


def _exp(tmp_path, name, **sections) -> Experiment:
    base = dict(
        name=name, output_dir=str(tmp_path),
        data=DataSpec(num_scenes=2, num_eval_scenes=1, num_views=3, image_size=64, batch_size=2),
        cameo=CameoSpec(weight=0.5, layer="depth:0.5", source="depth"),
        train=TrainSpec(steps=1, progress=False, checkpoint_every=0), eval=EvalSpec(every=0, at_start=False))
    return Experiment(**{**base, **sections})


def test_depth_targets_of_an_8x_latent_model_equal_a_pixel_model_at_the_same_token_stride(tmp_path):
    """DiT patch 2 on 8x latents: tokens 16 image px apart; a pixel-space DiT with patch 16 has the
    same tokens. Its grid, stride and `depth` targets are the latent model's (before the fix the
    latent run sized the grid from the image at stride 2: 32x32 tokens for an 8x8 latent)."""
    vae = write_micro_vae(tmp_path / "vae")
    latent = build_run(_exp(tmp_path, "latent", backbone=BackboneSpec("mv_dit", "micro"),
                            codec=CodecSpec(kind="vae", vae_path=str(vae))))
    pixel = build_run(_exp(tmp_path, "pixel", backbone=BackboneSpec("mv_dit", "micro", {"patch_size": 16})))
    assert latent.model.config.sample_size == 8 and pixel.model.config.sample_size == 64
    batch = step.local_batch(latent, 0)[0]
    assert batch["image"].shape[-2:] == (64, 64)
    grid_l, stride_l = step.layer_grid(latent, batch)
    grid_p, stride_p = step.layer_grid(pixel, batch)
    assert (grid_l, stride_l) == (grid_p, stride_p) == ((3, 4, 4), 16)
    t_l = compute_targets("depth", batch, grid_l, stride_l)
    t_p = compute_targets("depth", batch, grid_p, stride_p)
    assert t_l.valid.any()
    for a, b in ((t_l.idx, t_p.idx), (t_l.weight, t_p.weight), (t_l.valid, t_p.valid)):
        assert torch.equal(a, b)
    # and the latent run trains one CAMEO step on that grid
    metrics = step.train_step(latent, 0)
    assert math.isfinite(metrics["train/loss_cameo"])


def test_backbone_in_channels_come_from_the_codec(tmp_path):
    vae = write_micro_vae(tmp_path / "vae")
    run = build_run(_exp(tmp_path, "unet", backbone=BackboneSpec("mv_unet", "micro"),
                         cameo=CameoSpec(weight=0.5, layer="decoder:1/16", source="depth"),
                         codec=CodecSpec(kind="vae", vae_path=str(vae))))
    assert run.model.config.in_channels == 4 and run.codec.downsample == 8
    assert run.layer == "up.00.attn.00"  # decoder:1/16 with input_stride 8: the stride-2 decoder layer
    with pytest.raises(ExperimentError, match="in_channels = 4.*gives 3"):
        build_run(_exp(tmp_path, "bad", backbone=BackboneSpec("mv_dit", "micro", {"in_channels": 4})))
    with pytest.raises(ExperimentError, match="needs codec.vae_path"):
        build_run(_exp(tmp_path, "novae", backbone=BackboneSpec("mv_dit", "micro"), codec=CodecSpec(kind="vae")))


def test_init_from_loads_the_source_weights_through_the_build(tmp_path):
    torch.manual_seed(3)
    source = create_backbone("mv_dit", "micro", in_channels=4, sample_size=8)
    source.save_pretrained(tmp_path / "dit")
    vae = write_micro_vae(tmp_path / "vae")
    run = build_run(_exp(tmp_path, "init", backbone=BackboneSpec("mv_dit", "micro", init_from=str(tmp_path / "dit")),
                         codec=CodecSpec(kind="vae", vae_path=str(vae))))
    for (name, a), b in zip(source.state_dict().items(), run.model.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ExperimentError, match="init_from = .* does not exist"):
        build_run(_exp(tmp_path, "missing", backbone=BackboneSpec("mv_dit", "micro", init_from=str(tmp_path / "no"))))
    with pytest.raises(ExperimentError, match="takes 4 input channels.*gives 3"):
        build_run(_exp(tmp_path, "pixel", backbone=BackboneSpec("mv_dit", "micro", init_from=str(tmp_path / "dit"))))


# ---------------------------------------------------------------------------------------------
# the paper recipes cannot rot


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["cat3d_sd21", "mvdit_xl2"])
def test_paper_recipe_shrunk_trains_evaluates_and_checkpoints(recipe, tmp_path):
    from cameo_bench.engine.loop import fit

    torch.set_num_threads(1)
    full = config.parse([REPO / f"gin/experiments/{recipe}.gin"])
    exp = config.parse([REPO / f"gin/experiments/{recipe}.gin"],
                       ["run_experiment.shrink = True", f"run_experiment.output_dir = '{tmp_path}'",
                        "train.progress = False"])
    assert exp.shrink and exp.backbone.preset == "micro" and not exp.backbone.init_from and not exp.codec.vae_path
    # everything that is not a size is the recipe's
    for section in ("diffusion", "cameo", "optim"):
        assert getattr(exp, section) == getattr(full, section), section
    assert (exp.codec.kind, exp.train.precision, exp.backbone.gradient_checkpointing) == ("vae", "bf16", True)
    assert exp.eval.guidance_scale == 2.0 and exp.data.num_views == 4
    run = build_run(exp)
    assert run.codec.downsample == 8 and run.model.config.in_channels == 4
    metrics = fit(run)
    assert math.isfinite(metrics["eval/psnr"]) and metrics["eval/psnr"] > 0
    assert (tmp_path / recipe / "checkpoints").exists()


def test_recipes_say_what_the_paper_says():
    sd = config.parse([REPO / "gin/experiments/cat3d_sd21.gin"])
    assert (sd.backbone.name, sd.backbone.preset, sd.codec.kind, sd.data.image_size, sd.data.num_views) == (
        "mv_unet", "sd21", "vae", 512, 4)
    d = sd.diffusion
    assert (d.prediction_type, d.beta_schedule, d.snr_shift, d.rescale_zero_terminal_snr, d.camera_dropout) == (
        "v_prediction", "scaled_linear", 4.0, True, 0.1)
    c = sd.cameo
    assert (c.weight, c.layer, c.head, c.normalization, c.target, c.loss) == (
        0.02, "decoder:1/16", "mlp", "per_view", "onehot_per_view", "ce")
    o = sd.optim
    assert (o.lr, o.warmup_steps, o.weight_decay, o.grad_clip) == (2.5e-5, 500, 0.01, 1.0)
    assert (sd.train.precision, sd.backbone.gradient_checkpointing, sd.eval.sampler_steps, sd.eval.guidance_scale) == (
        "bf16", True, 50, 2.0)
    with torch.device("meta"):  # the selector is the paper's layer 10 on the SD-2.1 layout
        unet = create_backbone("mv_unet", "sd21")
    assert unet.resolve_layer(c.layer, input_stride=8) == "up.02.attn.00"
    dit = config.parse([REPO / "gin/experiments/mvdit_xl2.gin"])
    assert (dit.backbone.preset, dit.data.image_size, dit.diffusion.beta_schedule, dit.optim.lr) == (
        "XL/2", 256, "linear", 1e-4)


def test_shrink_must_be_a_bool():
    with pytest.raises(config.ConfigError, match="run_experiment.shrink"):
        config.parse([REPO / "gin/experiments/smoke.gin"], ["run_experiment.shrink = 'yes'"])


def test_pixel_codec_with_a_vae_path_is_refused():
    with pytest.raises(config.ConfigError, match="codec.kind = 'vae'"):
        config.parse([REPO / "gin/experiments/smoke.gin"], ["codec.vae_path = 'x'"])
    assert dataclasses.asdict(config.parse([REPO / "gin/experiments/smoke.gin"]).codec)["kind"] == "pixel"
