"""The multi-view diffusion objective and DDIM sampler, on diffusers schedulers, in the space of a codec.

One object owns the noise schedule so that training and sampling can never disagree on it: the
betas (scaled-linear, cosine or DDPM/DiT linear, optional SNR shift, optional zero-terminal-SNR
rescale) are built once and handed to both a `DDPMScheduler` (noising, v targets) and every
`DDIMScheduler` made for sampling.

The model runs on the codec's grid (`objectives.codecs`: pixels, or latents 8x smaller), while
cameras come in pixels of the image. Wherever the model is called, the intrinsics are rescaled to
the model's input grid (`model_intrinsics`), so the rays the backbone builds on that grid pass
through the same scene points as the image's pixels do. A batch that carries `latent [B, V, C, h, w]`
(the latent cache) is diffused as is and need not carry the images.

Multi-view specifics (CAT3D / CAMEO): views are ordered references first; references stay clean in
x_t at every training step and every sampling step, `cond_mask` is 0 for references and 1 for
targets, and the loss only sees target views. Classifier-free guidance drops the *cameras*
(not the references): a dropped sample gets identity `cam2world` for every view and one canonical
pinhole K (`canonical_cameras`), so the backbone's relative, translation-normalised raymaps are
identical across views: the model sees "no camera". CAMEO's released code drops per batch by
zeroing the Plücker channels; we drop per sample, and we go through the camera inputs because the
raymaps are built inside the backbone.

The model knows nothing about this module: it is called as
`model(x_t, t, cam2world=, intrinsics=, cond_mask=, tap=, perturb=)` and returns a
`backbones.interface.BackboneOutput`.
"""
from __future__ import annotations

from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

from cameo_bench import geometry
from cameo_bench.config.spec import DiffusionSpec
from cameo_bench.objectives.codecs import Codec, PixelCodec

__all__ = ["Codec", "PixelCodec", "MultiViewDiffusion", "make_betas", "model_intrinsics"]

# Stable Diffusion's scaled-linear range (CAMEO initialises from SD-2.1 and keeps its schedule);
# ignored by the cosine schedule, which is defined by alpha_bar alone.
SD_BETA_START, SD_BETA_END = 0.00085, 0.012
# DDPM's linear range (Ho et al. 2020), which DiT trains with (facebookresearch/DiT, 1000 steps).
LINEAR_BETA_START, LINEAR_BETA_END = 1e-4, 0.02
_BETA_RANGE = {"scaled_linear": (SD_BETA_START, SD_BETA_END), "linear": (LINEAR_BETA_START, LINEAR_BETA_END),
               "squaredcos_cap_v2": (SD_BETA_START, SD_BETA_END)}  # cosine: the range is unused


def make_betas(spec: DiffusionSpec) -> torch.Tensor:
    """The betas [T] (float64) that both schedulers receive as `trained_betas`."""
    start, end = _BETA_RANGE[spec.beta_schedule]
    base = DDPMScheduler(num_train_timesteps=spec.num_train_timesteps, beta_start=start,
                         beta_end=end, beta_schedule=spec.beta_schedule).betas.double()
    alphas_cumprod = torch.cumprod(1.0 - base, dim=0)  # [T]
    if spec.snr_shift != 1.0:
        # SNR = a / (1 - a); a' = a / (a + s (1 - a)) gives SNR' = SNR / s exactly.
        a = alphas_cumprod
        alphas_cumprod = a / (a + spec.snr_shift * (1.0 - a))
    prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])  # [T]
    betas = 1.0 - alphas_cumprod / prev
    if spec.rescale_zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def canonical_intrinsics(height: int, width: int, **like: Any) -> torch.Tensor:
    """The K every camera-dropped view gets: focal = max(H, W) px, principal point at the image
    centre (pixel centres at integers, so the centre is (W-1)/2, (H-1)/2). Its value is arbitrary;
    what matters is that it never depends on the sample."""
    f = float(max(height, width))
    return torch.tensor([[f, 0.0, (width - 1) / 2], [0.0, f, (height - 1) / 2], [0.0, 0.0, 1.0]], **like)


def canonical_cameras(intrinsics: torch.Tensor, cam2world: torch.Tensor, height: int,
                      width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The "no camera" input for classifier-free guidance, shaped like the real cameras."""
    K = canonical_intrinsics(height, width, dtype=intrinsics.dtype, device=intrinsics.device)
    eye = torch.eye(4, dtype=cam2world.dtype, device=cam2world.device)
    return K.expand_as(intrinsics).clone(), eye.expand_as(cam2world).clone()


def model_intrinsics(K: torch.Tensor, image_hw: tuple[int, int], model_hw: tuple[int, int]) -> torch.Tensor:
    """Intrinsics [..., 3, 3] in pixels of the model's input grid, from intrinsics in image pixels.

    Pixel centres sit at integers on both grids, so pixel u of the image covers [u - 1/2, u + 1/2)
    and the scale s = model size / image size applies about the pixel-corner origin:
    u' + 1/2 = s (u + 1/2), i.e. K' = A K with A = [[s_x, 0, (s_x - 1)/2], [0, s_y, (s_y - 1)/2],
    [0, 0, 1]] (for 512 px images on 64x64 latents: f' = f / 8, c' = (c + 1/2) / 8 - 1/2, so the
    image centre 255.5 lands on the latent centre 31.5). Returned unchanged (the same tensor) when
    the grids agree, so pixel-space runs compute exactly what they did before latents existed.
    """
    (H, W), (h, w) = tuple(image_hw), tuple(model_hw)
    if (H, W) == (h, w):
        return K
    return geometry.scale_intrinsics(K, w / W, h / H).to(K.dtype)


def reference_mask(num_ref: int | torch.Tensor, batch: int, views: int, device: torch.device) -> torch.Tensor:
    """[B, V] bool, True on reference views. `num_ref` is an int or a per-sample [B] tensor
    (a DataLoader collates the int into one)."""
    n = torch.as_tensor(num_ref, device=device).long().reshape(-1)  # [1] or [B]
    if n.numel() not in (1, batch):
        raise ValueError(f"batch['num_ref'] must be an int or shape [{batch}], got shape {tuple(n.shape)}")
    if (n < 0).any() or (n >= views).any():
        raise ValueError(f"batch['num_ref'] must be in [0, {views - 1}] so that every sample has a "
                         f"target view (V={views}), got {n.tolist()}")
    return torch.arange(views, device=device)[None, :] < n[:, None].expand(batch, 1)  # [B, V]


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """Noise drawn on the generator's device, so a CPU generator gives the same numbers for CUDA data."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(like)


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def _check_batch(batch: dict, downsample: int = 1) -> tuple[int, int, int, int]:
    """(B, V, H, W), H x W the image's size: from `image`, or for a latent-only batch (the latent
    cache) from `latent` times the codec's `downsample`."""
    for key in ("intrinsics", "cam2world", "num_ref"):
        if key not in batch:
            raise KeyError(f"batch is missing {key!r}; it has {sorted(batch)}")
    if "image" not in batch and "latent" not in batch:
        raise KeyError(f"batch has neither 'image' nor 'latent'; it has {sorted(batch)}")
    if "image" in batch:
        image = batch["image"]
        if image.ndim != 5 or image.shape[2] != 3:
            raise ValueError(f"batch['image'] must be [B, V, 3, H, W], got {tuple(image.shape)}")
        B, V, _, H, W = image.shape
    else:
        latent = batch["latent"]
        if latent.ndim != 5:
            raise ValueError(f"batch['latent'] must be [B, V, C, h, w], got {tuple(latent.shape)}")
        B, V, _, h, w = latent.shape
        H, W = h * downsample, w * downsample
    for key, tail in (("intrinsics", (3, 3)), ("cam2world", (4, 4))):
        if tuple(batch[key].shape) != (B, V, *tail):
            raise ValueError(f"batch[{key!r}] must be {(B, V, *tail)}, got {tuple(batch[key].shape)}")
    if "latent" in batch:
        latent = batch["latent"]
        if latent.ndim != 5 or tuple(latent.shape[:2]) != (B, V) or tuple(latent.shape[-2:]) != (
                H // downsample, W // downsample):
            raise ValueError(f"batch['latent'] must be [{B}, {V}, C, {H // downsample}, {W // downsample}] "
                             f"(images {H}x{W} / codec downsample {downsample}), got {tuple(latent.shape)}")
    return B, V, H, W


class _DDIMScheduler(DDIMScheduler):
    """diffusers' DDIM step, with one numerical guard.

    The step takes sqrt(1 - alpha_bar_prev - eta^2 var). At zero terminal SNR var equals
    1 - alpha_bar_prev analytically, so with eta = 1 rounding can make the root negative (NaN).
    Keeping var a few ulps below that bound changes nothing measurable elsewhere.
    """

    def _get_variance(self, timestep: int, prev_timestep: int) -> torch.Tensor:
        variance = super()._get_variance(timestep, prev_timestep)
        a_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        return torch.minimum(variance, (1.0 - a_prev) * (1.0 - 1e-6))


class MultiViewDiffusion:
    """Training objective and sampler for a multi-view backbone.

    Build from a `DiffusionSpec` (`MultiViewDiffusion(exp.diffusion)`) or from its fields as keyword
    values (`MultiViewDiffusion(snr_shift=4.0)`), which are validated by the spec either way; the
    spec is kept as `config`.
    `codec` maps images to the diffused space (default: pixels in [-1, 1]); a batch that carries
    `latent [B, V, C, h, w]` is diffused as is (plus `latent_std * eps` when it carries the
    posterior's `latent_std`), and `codec.decode` turns samples back into images.
    """

    def __init__(self, spec: DiffusionSpec | None = None, *, codec: Codec | None = None, **kwargs: Any):
        if spec is not None and kwargs:
            raise TypeError(f"pass either a DiffusionSpec or keyword values, not both (got {sorted(kwargs)})")
        if spec is not None and not isinstance(spec, DiffusionSpec):
            raise TypeError(f"spec must be a DiffusionSpec, got {type(spec).__name__}")
        self.config = spec if spec is not None else DiffusionSpec(**kwargs)  # diffusers' name for frozen settings
        self.codec = codec if codec is not None else PixelCodec()
        self.betas = make_betas(self.config)  # [T] float64
        self.scheduler = DDPMScheduler(**self._scheduler_kwargs())

    def _scheduler_kwargs(self) -> dict:
        # The rescale is already inside the betas; clip_sample stays off because x0 may be a latent.
        return dict(num_train_timesteps=self.config.num_train_timesteps,
                    trained_betas=self.betas.numpy(), prediction_type=self.config.prediction_type,
                    clip_sample=False)

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    @property
    def alphas_cumprod(self) -> torch.Tensor:  # [T] float32, exactly what the schedulers use
        return self.scheduler.alphas_cumprod

    def snr(self) -> torch.Tensor:  # [T]
        a = self.alphas_cumprod.double()
        return a / (1.0 - a)

    def min_snr_weight(self, t: torch.Tensor) -> torch.Tensor:  # [B] float32
        """Min-SNR-gamma loss weights of timesteps `t [B]` (diffusers' training scripts compute the
        same from `training_utils.compute_snr`, whose import costs ~3 s in every worker)."""
        snr = self.snr().to(t.device)[t]  # [B] float64
        clipped = torch.clamp(snr, max=self.config.min_snr_gamma)
        return (clipped / (snr + 1.0) if self.config.prediction_type == "v_prediction" else clipped / snr).float()

    def ddim_scheduler(self, num_steps: int) -> DDIMScheduler:
        """A DDIM scheduler on the training betas. "trailing" spacing starts at t = T-1, the only
        choice that reaches the zero-SNR step (Lin et al. 2023, Table 2), and harmless otherwise;
        `set_alpha_to_one` makes the last step return the predicted x0."""
        scheduler = _DDIMScheduler(**self._scheduler_kwargs(), set_alpha_to_one=True, timestep_spacing="trailing")
        scheduler.set_timesteps(num_steps)
        return scheduler

    def to_model_space(self, batch: dict) -> torch.Tensor:  # [B, V, C, h, w]
        if "latent" in batch:
            latent = batch["latent"].float()
            if "latent_std" in batch:  # cached posterior moments: one draw (codec.encoding = 'sample')
                latent = latent + batch["latent_std"].float() * torch.randn_like(latent)
            return latent
        return self.codec.encode(batch["image"].float())

    def image_size(self, batch: dict) -> tuple[int, int]:
        """(H, W) of the batch's images, also for a latent-only batch."""
        return _check_batch(batch, self.codec.downsample)[2:]

    def model_shape(self, batch: dict) -> tuple[int, int, int, int, int]:
        """[B, V, C, h, w] of `to_model_space(batch)`, without encoding anything."""
        if "latent" in batch:
            return tuple(batch["latent"].shape)
        B, V, _, H, W = batch["image"].shape  # the shape encoding would give; nothing else is read
        ds = self.codec.downsample
        return B, V, self.codec.channels, H // ds, W // ds

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model regresses: v = sqrt(a) eps - sqrt(1-a) x0, or eps."""
        if self.config.prediction_type == "epsilon":
            return noise
        return self.scheduler.get_velocity(x0, noise, t)

    def drop_cameras(self, batch: dict, drop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(intrinsics, cam2world) with the samples where `drop [B]` is True set to the canonical
        "no camera" input (identity poses, canonical K) for every view."""
        _, _, H, W = _check_batch(batch, self.codec.downsample)
        K, c2w = batch["intrinsics"], batch["cam2world"]
        K0, c2w0 = canonical_cameras(K, c2w, H, W)
        d = drop.to(K.device)[:, None, None, None]  # [B, 1, 1, 1]
        return torch.where(d, K0, K), torch.where(d, c2w0, c2w)

    def training_loss(self, model, batch: dict, t: torch.Tensor | None = None,
                      generator: torch.Generator | None = None, tap=None,
                      perturb: dict | None = None, *, camera_drop: torch.Tensor | None = None,
                      noise: torch.Tensor | None = None, weigh_timesteps: bool = True) -> tuple[torch.Tensor, dict]:
        """MSE on target views of one noised forward; the tap of that same forward is in `aux["tap"]`.

        Random draws, in this order from `generator`: t [B], camera drop [B], noise; each one only
        when it is not given. Giving all three lets a caller draw per sample (DDP: the draws of a
        sample must not depend on which rank holds it).
        aux: `t [B]`, `camera_dropped [B] bool`, `cond_mask [B, V]`, `loss_per_sample [B]` (detached,
        for loss-vs-t curves; never timestep-weighted), `tap` (TapResult or None).
        `weigh_timesteps = False`: the plain MSE even under `min_snr_gamma` (held-out losses).
        """
        B, V, H, W = _check_batch(batch, self.codec.downsample)
        x0 = self.to_model_space(batch)  # [B, V, C, h, w]
        device = x0.device
        T = self.num_train_timesteps
        if t is None:
            gen_device = generator.device if generator is not None else device
            t = torch.randint(0, T, (B,), generator=generator, device=gen_device).to(device)
        t = torch.as_tensor(t, device=device).long().expand(B)  # [B]
        if (t < 0).any() or (t >= T).any():
            raise ValueError(f"timesteps must be in [0, {T}), got {t.tolist()}")
        if camera_drop is None:
            camera_drop = _rand((B,), generator, device) < self.config.camera_dropout
        drop = torch.as_tensor(camera_drop, device=device).bool().expand(B)  # [B]
        if noise is None:
            noise = _randn(tuple(x0.shape), generator, x0)
        elif tuple(noise.shape) != tuple(x0.shape):
            raise ValueError(f"noise {tuple(noise.shape)} must have the model-space shape {tuple(x0.shape)}")
        noise = noise.to(x0)  # [B, V, C, h, w]

        is_ref = reference_mask(batch["num_ref"], B, V, device)  # [B, V]
        ref5 = is_ref[:, :, None, None, None]
        x_t = torch.where(ref5, x0, self.scheduler.add_noise(x0, noise, t))  # references stay clean
        cond_mask = (~is_ref).to(x0.dtype)  # [B, V]: 0 reference, 1 target
        intrinsics, cam2world = self.drop_cameras(batch, drop)
        intrinsics = model_intrinsics(intrinsics, (H, W), x0.shape[-2:])  # rays on the model's grid

        out = model(x_t, t, cam2world=cam2world, intrinsics=intrinsics, cond_mask=cond_mask,
                    tap=tap, perturb=perturb)
        if out.sample.shape != x0.shape:
            raise ValueError(f"model output sample {tuple(out.sample.shape)} != input {tuple(x0.shape)}")
        target = self.target(x0, noise, t)  # [B, V, C, h, w]
        err = (out.sample.float() - target.float()).pow(2).mean(dim=(2, 3, 4))  # [B, V]
        weight = cond_mask.float()  # [B, V]
        per_sample = (err * weight).sum(1) / weight.sum(1)  # [B]
        if weigh_timesteps and self.config.min_snr_gamma > 0:
            loss = (per_sample * self.min_snr_weight(t)).mean()
        else:
            loss = (err * weight).sum() / weight.sum()
        per_sample = per_sample.detach()
        aux = dict(t=t, camera_dropped=drop, cond_mask=cond_mask, loss_per_sample=per_sample, tap=out.tap)
        return loss, aux

    @torch.no_grad()
    def sample(self, model, batch: dict, num_steps: int = 50, guidance_scale: float = 2.0,
               generator: torch.Generator | None = None, eta: float = 0.0) -> torch.Tensor:
        """DDIM sampling of the target views given the clean references -> images [B, V, 3, H, W] in
        [0, 1] (reference views are returned as given).

        Guidance: out = uncond + g (cond - uncond), uncond = cameras dropped as in training; both
        branches go through one forward of batch 2B. g = 1 runs the conditional branch alone.
        The model's train/eval mode is left to the caller.
        """
        B, V, H, W = _check_batch(batch, self.codec.downsample)
        x0 = self.to_model_space(batch)  # [B, V, C, h, w]
        device = x0.device
        is_ref = reference_mask(batch["num_ref"], B, V, device)  # [B, V]
        ref5 = is_ref[:, :, None, None, None]
        cond_mask = (~is_ref).to(x0.dtype)  # [B, V]
        K, c2w = batch["intrinsics"], batch["cam2world"]
        guided = guidance_scale != 1.0
        if guided:
            K_un, c2w_un = self.drop_cameras(batch, torch.ones(B, dtype=torch.bool, device=device))
            K, c2w = torch.cat([K, K_un]), torch.cat([c2w, c2w_un])  # [2B, V, ...]
            cond_mask = torch.cat([cond_mask, cond_mask])
        K = model_intrinsics(K, (H, W), x0.shape[-2:])  # rays on the model's grid

        scheduler = self.ddim_scheduler(num_steps)
        x = torch.where(ref5, x0, _randn(tuple(x0.shape), generator, x0))  # [B, V, C, h, w]
        for step_t in scheduler.timesteps:
            x_in = torch.cat([x, x]) if guided else x
            t = torch.full((x_in.shape[0],), int(step_t), device=device, dtype=torch.long)
            pred = model(x_in, t, cam2world=c2w, intrinsics=K, cond_mask=cond_mask).sample.float()
            if guided:
                cond, uncond = pred.chunk(2)
                pred = uncond + guidance_scale * (cond - uncond)
            out = scheduler.step(pred, int(step_t), x, eta=eta, generator=generator)
            x = torch.where(ref5, x0, out.prev_sample)  # references re-clamped to their clean value
        # The last step's x0 prediction, not prev_sample: diffusers steps back by T // num_steps, so
        # when num_steps does not divide T the trailing grid ends at t = 0, not at alpha_bar = 1,
        # and prev_sample would keep (and with eta > 0 add) noise. Both agree when it divides T.
        images = self.codec.decode(torch.where(ref5, x0, out.pred_original_sample))
        if "image" not in batch:  # a latent-only batch: the references as the codec gives them back
            return images
        return torch.where(ref5, batch["image"].to(images), images)
