"""`noisy_depth`: the `depth` source fed with depth and poses corrupted the way estimators err.

Answers "how good must the geometry be?": one `noise` level drives every perturbation (each can be
overridden), and the occlusion tolerance grows with it (about 3 sigma, notes/data.md 2d), because
with a 1 % tolerance a 5 % depth error would reject most truly visible pixels.
Perturbations, applied independently per view:
  * global scale exp(scale * n) and a shift in disparity (`shift` x the view's median disparity);
  * a smooth multiplicative field exp(field * up(N(0, 1) on a field_grid^2 grid)), low frequency like
    a monocular estimator's error;
  * holes: random blobs covering about `holes` of the pixels become invalid depth;
  * pose noise: a rotation of `rot_deg` degrees (sigma, random axis) and a translation with sigma
    `trans` x the mean distance between the sample's cameras.
The targets' `cost` is `depth`'s, measured on the corrupted geometry: what a run with estimated
depth would rank key views by under `onehot_global`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cameo_bench.correspondence.depth import DEPTH_KEYS, depth_targets
from cameo_bench.correspondence.registry import register_source
from cameo_bench.correspondence.targets import CorrespondenceTargets


def _randn(shape, generator, device, dtype) -> torch.Tensor:
    # Drawn on the CPU so that a seeded run gives the same noise on every device.
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)


def _smooth_field(B, V, H, W, grid_size, generator, device, dtype) -> torch.Tensor:  # [B, V, H, W]
    coarse = _randn((B * V, 1, grid_size, grid_size), generator, device, dtype)
    return F.interpolate(coarse, size=(H, W), mode="bicubic", align_corners=False).reshape(B, V, H, W)


def _axis_angle(rotvec: torch.Tensor) -> torch.Tensor:  # [..., 3] -> [..., 3, 3] (Rodrigues)
    theta = rotvec.norm(dim=-1, keepdim=True)[..., None]  # [..., 1, 1]
    axis = rotvec / rotvec.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    x, y, z = axis.unbind(-1)
    zero = torch.zeros_like(x)
    Kx = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).reshape(*axis.shape[:-1], 3, 3)
    eye = torch.eye(3, dtype=rotvec.dtype, device=rotvec.device).expand_as(Kx)
    return eye + theta.sin() * Kx + (1 - theta.cos()) * (Kx @ Kx)


def perturb_depth(
    depth: torch.Tensor, *, scale: float, shift: float, field: float, field_grid: int, holes: float, generator
) -> torch.Tensor:
    """Noisy copy of depth [B, V, H, W]; invalid pixels stay invalid."""
    B, V, H, W = depth.shape
    dev, dt = depth.device, depth.dtype
    valid = torch.isfinite(depth) & (depth > 0)
    out = torch.where(valid, depth, torch.zeros_like(depth))
    if scale > 0:
        out = out * torch.exp(scale * _randn((B, V, 1, 1), generator, dev, dt))
    if shift > 0:
        disparity = torch.where(valid, 1.0 / out.clamp(min=1e-12), torch.full_like(out, float("nan")))
        median = disparity.flatten(2).nanmedian(dim=-1).values.nan_to_num(0.0)[..., None, None]  # [B, V, 1, 1]
        offset = shift * median * _randn((B, V, 1, 1), generator, dev, dt)
        # A large negative shift must not flip points behind the camera: keep disparity positive.
        disparity = torch.maximum(disparity + offset, 1e-3 * median)
        out = torch.where(valid, 1.0 / disparity, out)
    if field > 0:
        out = out * torch.exp(field * _smooth_field(B, V, H, W, field_grid, generator, dev, dt))
    if holes > 0:
        # Threshold a smooth field at its `holes` quantile: blobs, not salt-and-pepper.
        blobs = _smooth_field(B, V, H, W, field_grid, generator, dev, dt).flatten(2)
        cut = torch.quantile(blobs, min(holes, 1.0), dim=-1, keepdim=True)
        out = torch.where((blobs < cut).reshape(B, V, H, W), torch.zeros_like(out), out)
    return torch.where(valid, out, torch.zeros_like(out))


def perturb_poses(cam2world: torch.Tensor, *, rot_deg: float, trans: float, generator) -> torch.Tensor:
    """cam2world [B, V, 4, 4] with a random rotation and translation applied in the camera frame."""
    B, V = cam2world.shape[:2]
    dev, dt = cam2world.device, cam2world.dtype
    out = cam2world.clone()
    if rot_deg > 0:
        rotvec = _randn((B, V, 3), generator, dev, dt) * math.radians(rot_deg)
        out[..., :3, :3] = cam2world[..., :3, :3] @ _axis_angle(rotvec)
    if trans > 0:
        centres = cam2world[..., :3, 3]  # [B, V, 3]
        spacing = torch.cdist(centres, centres).sum((-1, -2)) / max(V * (V - 1), 1)  # [B] mean distance
        out[..., :3, 3] = centres + trans * spacing[:, None, None] * _randn((B, V, 3), generator, dev, dt)
    return out


@register_source("noisy_depth", requires=(DEPTH_KEYS,))
def noisy_depth_source(
    batch, grid, stride, *,
    noise: float = 0.05,
    scale: float | None = None,
    shift: float | None = None,
    field: float | None = None,
    field_grid: int = 8,
    holes: float | None = None,
    rot_deg: float | None = None,
    trans: float | None = None,
    rel_tol: float = 0.02,
    tol_factor: float = 3.0,
    seed: int | None = None,
    mode: str = "center",
    k: int = 4,
    min_visible: float = 0.5,
) -> CorrespondenceTargets:
    """Depth targets from perturbed depth and poses; tolerance rel_tol + tol_factor * noise.

    Defaults derived from `noise` (sigma, relative): scale = field = noise, shift = noise / 2,
    holes = min(noise, 0.5) of the pixels, rot_deg = 10 * noise degrees, trans = noise / 2 of the
    mean camera spacing. `seed` fixes the noise (a fresh generator per call: the same corruption
    for the same batch); None draws from torch's global generator. At noise 0 this is `depth`.
    """
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    generator = None
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
    pick = lambda value, default: default if value is None else value  # noqa: E731
    depth = perturb_depth(
        batch["depth"],
        scale=pick(scale, noise),
        shift=pick(shift, noise / 2),
        field=pick(field, noise),
        field_grid=field_grid,
        holes=pick(holes, min(noise, 0.5)),
        generator=generator,
    )
    cam2world = perturb_poses(
        batch["cam2world"], rot_deg=pick(rot_deg, 10 * noise), trans=pick(trans, noise / 2), generator=generator
    )
    return depth_targets(
        depth, batch["intrinsics"], cam2world, grid, stride,
        mode=mode, k=k, min_visible=min_visible, rel_tol=rel_tol + tol_factor * noise,
    )
