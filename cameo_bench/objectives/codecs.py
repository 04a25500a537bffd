"""Codecs: the map between images in [0, 1] and the space the model diffuses in (pixels, or a local VAE's latents).

Every codec exposes `channels` (model-space channels: the backbone's `in_channels`), `downsample`
(image pixels per model-space pixel: 1 for pixels, 8 for SD's VAE), `encode(images [B, V, 3, H, W])
-> [B, V, C, H / downsample, W / downsample]` and `decode(x) -> images in [0, 1]`. `downsample` is
what every grid computation needs: the model input's stride in image pixels (`resolve_layer(...,
input_stride=)`), the token stride of a layer in image pixels (`downsample x layer.stride`), and
the factor by which the intrinsics are rescaled to the model's input grid.

`VaeCodec` wraps a local diffusers `AutoencoderKL` (nothing is downloaded): latents are
`(z - shift_factor) * scaling_factor` with both factors from the VAE's config (0.18215 and no shift
for SD-2.x), encoded with the posterior mean or one draw from the posterior, and decoded in slices
of `decode_batch` frames so that evaluating a large batch never holds the whole decoder activation.
The VAE runs in fp32 outside autocast: SD's VAE overflows in fp16, and encoding is data, not
something the training precision should change.
"""
from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Protocol

import torch

# A VAE of SD's shape (3 downsamplings, 4 latent channels) small enough for CPU tests and shrunk
# recipes: 8 px of image per latent pixel, like the real one.
MICRO_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
    block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64,
)
# Stable Diffusion 2.x's VAE (stabilityai/stable-diffusion-2-1/vae/config.json): the full-shape
# stand-in the GPU check initialises at random.
SD_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=768, scaling_factor=0.18215,
)


class Codec(Protocol):
    """Maps images in [0, 1] to the space the model diffuses in, and back."""

    channels: int  # model-space channels
    downsample: int  # image pixels per model-space pixel

    def encode(self, image: torch.Tensor) -> torch.Tensor: ...  # [B, V, 3, H, W] -> [B, V, C, h, w]

    def decode(self, x: torch.Tensor) -> torch.Tensor: ...  # [B, V, C, h, w] -> [B, V, 3, H, W]

    def to(self, device) -> "Codec": ...  # the run's device (a VAE's weights move there)


class PixelCodec:
    """Pixel-space diffusion: x0 = 2 * image - 1, so data sits in [-1, 1] like SD latents roughly do."""

    channels = 3
    downsample = 1

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return image * 2.0 - 1.0

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return ((x + 1.0) * 0.5).clamp(0.0, 1.0)

    def to(self, device) -> "PixelCodec":
        return self


def vae_folder(path: str | pathlib.Path) -> pathlib.Path:
    """The folder holding the AutoencoderKL's config.json: `path` itself, or its `vae/` subfolder
    (an SD pipeline folder). Raises naming what a VAE folder must contain."""
    path = pathlib.Path(path)
    for folder in (path, path / "vae"):
        if (folder / "config.json").is_file():
            config = json.loads((folder / "config.json").read_text())
            if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
                raise ValueError(f"{folder / 'config.json'}: _class_name is {config['_class_name']!r}, "
                                 "not 'AutoencoderKL': a VAE folder is a diffusers AutoencoderKL folder")
            return folder
    raise FileNotFoundError(
        f"{path}: no AutoencoderKL config.json in it or in its vae/ subfolder; "
        "a VAE folder holds config.json and diffusion_pytorch_model.safetensors (e.g. the vae/ folder "
        "of stabilityai/stable-diffusion-2-1)")


def codec_downsample(kind: str, vae_path: str = "") -> int:
    """Image pixels per model-space pixel of a `codec.*` section without loading any weights (for
    resolving layer selectors such as `decoder:1/16` from a config alone): 1 for pixels; for a VAE
    read from its config.json, the random micro VAE's when there is no folder (a shrunk recipe)."""
    if kind != "vae":
        return 1
    config = json.loads((vae_folder(vae_path) / "config.json").read_text()) if vae_path else MICRO_VAE_CONFIG
    return 2 ** (len(config["block_out_channels"]) - 1)


def random_vae(config: dict | None = None, seed: int = 0):
    """An AutoencoderKL at random initialisation (default: `MICRO_VAE_CONFIG`), drawn from its own
    generator so that making it never moves the global random stream."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(**(config or MICRO_VAE_CONFIG))


class VaeCodec:
    """Latents of a diffusers `AutoencoderKL`: `(z - shift) * scale`, z the posterior mean or a draw.

    `sample=True` draws z = mean + std * eps with eps from torch's global generator (the training
    step seeds it per batch, so draws are reproducible and resume exactly).
    """

    def __init__(self, vae, *, sample: bool = False, decode_batch: int = 8, encode_batch: int = 16,
                 source: str = ""):
        self.vae = vae.eval().requires_grad_(False)
        cfg = vae.config
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = float(cfg.shift_factor) if getattr(cfg, "shift_factor", None) is not None else 0.0
        self.channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)  # every block but the last halves
        self.sample, self.decode_batch, self.encode_batch = sample, decode_batch, encode_batch
        self.source = source  # the folder it came from ('' for an in-memory VAE)
        self._identity: str | None = None

    @classmethod
    def from_folder(cls, path: str | pathlib.Path, **kwargs) -> "VaeCodec":
        """Load a local AutoencoderKL folder (or an SD pipeline folder's vae/); never the hub."""
        from diffusers import AutoencoderKL

        folder = vae_folder(path)
        with torch.random.fork_rng(devices=[]):  # without accelerate, diffusers initialises at random first
            vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True)
        return cls(vae, source=str(folder), **kwargs)

    def to(self, device) -> "VaeCodec":
        self.vae.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def identity(self) -> str:
        """sha256 of the VAE's config (public keys) and weights, in a fixed order: the latent
        cache's key, the same for a folder and a copy of it, different after any weight change."""
        if self._identity is None:
            h = hashlib.sha256()
            config = {k: v for k, v in dict(self.vae.config).items() if not k.startswith("_")}
            h.update(json.dumps(config, sort_keys=True, default=list).encode())
            for name, value in sorted(self.vae.state_dict().items()):
                h.update(name.encode())
                h.update(str(tuple(value.shape)).encode())
                h.update(value.detach().float().cpu().contiguous().numpy().tobytes())
            self._identity = h.hexdigest()
        return self._identity

    def _check_size(self, H: int, W: int) -> None:
        if H % self.downsample or W % self.downsample:
            raise ValueError(f"images of {H}x{W} px do not fit a VAE that downsamples by {self.downsample}: "
                             f"use a data.image_size divisible by {self.downsample}")

    @torch.no_grad()
    def moments(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and std, unscaled: frames [N, 3, H, W] in [0, 1] -> 2 x [N, C, h, w] fp32."""
        self._check_size(*frames.shape[-2:])
        means, stds = [], []
        with torch.autocast(frames.device.type, enabled=False):
            for chunk in frames.split(self.encode_batch):
                dist = self.vae.encode(chunk.float().to(self.device) * 2.0 - 1.0).latent_dist
                means.append(dist.mean.float())
                stds.append(dist.std.float())
        return torch.cat(means).to(frames.device), torch.cat(stds).to(frames.device)

    def scale(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latent -> model space."""
        return (z - self.shift_factor) * self.scaling_factor

    def unscale(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.scaling_factor + self.shift_factor

    def from_moments(self, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """Model-space latents from unscaled posterior moments: the mean, or one draw."""
        z = mean + std * torch.randn_like(std) if self.sample else mean
        return self.scale(z)

    def encode(self, image: torch.Tensor) -> torch.Tensor:  # [B, V, 3, H, W] -> [B, V, C, h, w]
        B, V = image.shape[:2]
        mean, std = self.moments(image.flatten(0, 1))
        return self.from_moments(mean, std).unflatten(0, (B, V))

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:  # [B, V, C, h, w] -> [B, V, 3, H, W] in [0, 1]
        B, V = x.shape[:2]
        frames = []
        with torch.autocast(x.device.type, enabled=False):
            for chunk in self.unscale(x.float()).flatten(0, 1).split(self.decode_batch):
                frames.append(self.vae.decode(chunk.to(self.device)).sample.float().to(x.device))
        return ((torch.cat(frames) + 1.0) * 0.5).clamp(0.0, 1.0).unflatten(0, (B, V))
