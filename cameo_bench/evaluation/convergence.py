"""Cheap, low-variance convergence metrics: held-out diffusion loss and one-step x0 PSNR at fixed (t, noise).

Sampling PSNR needs 10-50 model calls per batch and its value moves with the sampling noise; the
training loss moves with each step's random t and noise. Here every evaluation scores the same
held-out views at the same timesteps with the same noise (a generator fixed by seed, batch and
timestep), so two evaluations differ only by the weights:
  * `eval/heldout_loss/t<t>` and their mean `eval/heldout_loss`: the training objective (target
    views only, cameras kept) at K timesteps t = k T / K, k = 0..K-1 (`eval.convergence_timesteps`,
    default 8);
  * `eval/x0_psnr/t<t>` at t = T/4, T/2, 3T/4: PSNR of the target views decoded from the model's
    one-step estimate of x0 from x_t (x0 = sqrt(a) x_t - sqrt(1 - a) v, or (x_t - sqrt(1 - a) eps) / sqrt(a)).
Both come from the same forward where the timesteps coincide (K a multiple of 4): one model call per
(batch, timestep), K per batch in all.
  * `eval/reference_use` at t = 3T/4 (one more call per batch): how many dB the x0 PSNR of the
    target views drops when each scene's reference images are replaced by the next scene's of the
    batch (cameras, noise and targets unchanged). Why: a denoiser can lower the loss by denoising
    each target on its own, and its x0 PSNR then still climbs while it never looks at the
    references; such a model cannot synthesise a novel view, and this number says so at once (on
    the issue-13 scenes with every view at one camera, after 600 steps: tiny UNet 0.2 dB, tiny DiT
    9.1). Batches of one scene have no other scene to borrow from and are skipped.
"""
from __future__ import annotations

import torch
from einops import rearrange

from cameo_bench.evaluation.metrics import image_metrics
from cameo_bench.tracking import keys

NUM_TIMESTEPS = 8  # default K: loss timesteps k T / 8 spread over [0, T) and containing T/4, T/2, 3T/4
X0_FRACTIONS = (0.25, 0.5, 0.75)
_SEED_STRIDE = 1_000_003


def loss_timesteps(T: int, num_timesteps: int = NUM_TIMESTEPS) -> list[int]:
    return sorted({k * T // num_timesteps for k in range(num_timesteps)})


def x0_timesteps(T: int) -> list[int]:
    return [int(f * T) for f in X0_FRACTIONS]


def fixed_noise(shape: tuple[int, ...], seed: int, batch_no: int, t: int) -> torch.Tensor:
    """The noise of (batch, timestep): the same tensor at every evaluation of a run (CPU generator,
    so it does not depend on the device either)."""
    generator = torch.Generator().manual_seed((seed * _SEED_STRIDE + batch_no) * _SEED_STRIDE + t)
    return torch.randn(shape, generator=generator)


def predict_x0(x_t: torch.Tensor, prediction: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """x0 implied by the model's output at a timestep whose alpha_bar [B] is given; shapes [B, ...]."""
    a = alpha_bar.to(x_t).reshape(-1, *[1] * (x_t.ndim - 1))
    if prediction_type == "epsilon":
        return (x_t - (1 - a).sqrt() * prediction) / a.sqrt()
    if prediction_type == "v_prediction":
        return a.sqrt() * x_t - (1 - a).sqrt() * prediction
    raise ValueError(f"diffusion.prediction_type {prediction_type!r}: x0 is defined for 'epsilon' and 'v_prediction'")


class _Recorder:
    """Calls the model and keeps its input x_t and output, so the loss's own forward also gives x0."""

    def __init__(self, model):
        self.model = model
        self.x_t = self.sample = None

    def __call__(self, x_t, *args, **kwargs):
        out = self.model(x_t, *args, **kwargs)
        self.x_t, self.sample = x_t, out.sample
        return out


@torch.no_grad()
def convergence_metrics(model, diffusion, batches: list[dict], *, seed: int = 0,
                        num_timesteps: int = NUM_TIMESTEPS) -> dict[str, float]:
    """`eval/heldout_loss[/t<t>]`, `eval/x0_psnr/t<t>` and `eval/reference_use` of `model` on
    `batches` (see the module doc).
    The caller puts the model in eval mode."""
    T = diffusion.num_train_timesteps
    loss_ts, x0_ts = loss_timesteps(T, num_timesteps), x0_timesteps(T)
    loss_sum = {t: 0.0 for t in loss_ts}
    total = 0.0  # target views seen
    psnr: dict[int, list[torch.Tensor]] = {t: [] for t in x0_ts}
    use_t = x0_ts[-1]
    use_drop: list[torch.Tensor] = []  # per target view: PSNR with its references - with another scene's
    for b, batch in enumerate(batches):
        num_ref = int(batch["num_ref"])
        x0 = diffusion.to_model_space(batch)  # [B, V, C, h, w]
        B, V = x0.shape[:2]
        n = float(B * (V - num_ref))  # target views: the loss is their mean
        no_drop = torch.zeros(B, dtype=torch.bool, device=x0.device)
        gt = rearrange(batch["image"][:, num_ref:].float(), "b v c h w -> (b v) c h w")
        for t in sorted(set(loss_ts) | set(x0_ts)):
            recorder = _Recorder(model)
            noise = fixed_noise(tuple(x0.shape), seed, b, t).to(x0)
            t_batch = torch.full((B,), t, dtype=torch.long, device=x0.device)
            loss, _ = diffusion.training_loss(recorder, batch, t=t_batch, camera_drop=no_drop, noise=noise,
                                              weigh_timesteps=False)
            if t in loss_sum:
                loss_sum[t] += float(loss) * n
            if t in psnr:
                images = _decoded_x0(diffusion, recorder, t_batch)[:, num_ref:]  # [B, T, 3, H, W]
                pred = rearrange(images, "b v c h w -> (b v) c h w")
                psnr[t].append(image_metrics(pred, gt)["psnr"].cpu())
                if t == use_t and B > 1 and num_ref > 0:
                    recorder = _Recorder(model)
                    diffusion.training_loss(recorder, _borrow_references(batch, num_ref), t=t_batch,
                                            camera_drop=no_drop, noise=noise)
                    swapped = _decoded_x0(diffusion, recorder, t_batch)[:, num_ref:]
                    swapped = rearrange(swapped, "b v c h w -> (b v) c h w")
                    use_drop.append((psnr[t][-1] - image_metrics(swapped, gt)["psnr"].cpu()))
        total += n
    out = {keys.at_timestep(keys.HELDOUT_LOSS, t): s / total for t, s in loss_sum.items()}
    out[keys.HELDOUT_LOSS] = sum(out.values()) / len(out)
    out.update({keys.at_timestep(keys.X0_PSNR, t): float(torch.cat(v).mean()) for t, v in psnr.items() if v})
    if use_drop:
        out[keys.REFERENCE_USE] = float(torch.cat(use_drop).mean())
    return out


def _borrow_references(batch: dict, num_ref: int) -> dict:
    """The batch with each scene's reference images replaced by those of the next scene (rolled by
    one): cameras, depth and targets stay the scene's own."""
    out = dict(batch)
    for key in ("image", "latent", "latent_std"):  # cached latents are what the model sees, when present
        if key in batch:
            value = batch[key].clone()  # [B, V, ...]
            value[:, :num_ref] = batch[key][:, :num_ref].roll(1, dims=0)
            out[key] = value
    return out


def _decoded_x0(diffusion, recorder: _Recorder, t_batch: torch.Tensor) -> torch.Tensor:
    """Images [B, V, 3, H, W] decoded from the one-step x0 estimate of the recorded forward."""
    alpha_bar = diffusion.alphas_cumprod.to(recorder.x_t.device)[t_batch]  # [B]
    x0_hat = predict_x0(recorder.x_t.float(), recorder.sample.float(), alpha_bar,
                        diffusion.config.prediction_type)  # [B, V, C, h, w]
    return diffusion.codec.decode(x0_hat)
