"""Camera conditioning shared by every backbone: Plücker raymaps, the reference mask, the encoder.

Conventions match the data (OpenCV axes, camera-to-world, K in pixels of the image whose H x W the
raymap is built for, integer pixel centres). This module is the one definition of "relative to the
reference camera", so every architecture sees the same camera signal.
"""
from __future__ import annotations

from typing import Literal

import torch
from einops import rearrange
from torch import nn

__all__ = ["plucker_rays", "relative_cameras", "camera_conditioning", "CameraEncoder"]


def _check(name: str, x: torch.Tensor, tail: tuple[int, ...]) -> None:
    if x.ndim != 2 + len(tail) or tuple(x.shape[2:]) != tail:
        raise ValueError(f"{name} must have shape [B, V, {', '.join(map(str, tail))}], got {tuple(x.shape)}")


def plucker_rays(K: torch.Tensor, c2w: torch.Tensor, H: int, W: int) -> torch.Tensor:  # [B, V, 6, H, W]
    """Per-pixel Plücker coordinates (d, o x d) of the ray through each pixel centre.

    d is the unit world-frame direction and o the camera centre; the moment o x d is the same for
    every point on the ray, so the 6 numbers describe the line itself, not where it starts.
    """
    _check("K", K, (3, 3))
    _check("c2w", c2w, (4, 4))
    dtype = torch.promote_types(K.dtype, c2w.dtype) if K.is_floating_point() else c2w.dtype
    K, c2w = K.to(dtype), c2w.to(dtype)
    v, u = torch.meshgrid(
        torch.arange(H, dtype=dtype, device=K.device),
        torch.arange(W, dtype=dtype, device=K.device),
        indexing="ij",
    )
    uv1 = torch.stack([u, v, torch.ones_like(u)], dim=-1)  # [H, W, 3]
    # Camera-frame directions, then rotate to the world: d = R K^-1 [u, v, 1]^T.
    to_world = c2w[..., :3, :3] @ torch.linalg.inv(K)  # [B, V, 3, 3]
    d = torch.einsum("bvij,hwj->bvhwi", to_world, uv1)  # [B, V, H, W, 3]
    d = d / d.norm(dim=-1, keepdim=True)
    o = c2w[..., :3, 3][:, :, None, None, :].expand_as(d)  # [B, V, H, W, 3]
    moment = torch.linalg.cross(o, d, dim=-1)  # [B, V, H, W, 3]
    return rearrange(torch.cat([d, moment], dim=-1), "b v h w c -> b v c h w")


def relative_cameras(
    c2w: torch.Tensor,
    ref_index: int = 0,
    translation_norm: Literal["max", "mean", "none"] = "max",
    eps: float = 1e-8,
) -> torch.Tensor:  # [B, V, 4, 4]
    """Express all cameras in the reference camera's frame and fix the translation scale.

    c2w_rel = inv(c2w_ref) @ c2w_v, i.e. the world frame is replaced by the reference camera frame
    (a rigid change of frame, so rays through corresponding pixels still meet, at inv(c2w_ref) X).
    CAMEO's released code instead left-multiplies the world-to-camera matrices by c2w_ref, which is
    not a change of frame and breaks that property. Translations are then divided by the largest
    ("max", CAMEO's choice) or mean camera distance from the reference, so scenes of any scale
    give rays of comparable moments; a scene whose cameras all coincide keeps scale 1.
    """
    _check("c2w", c2w, (4, 4))
    V = c2w.shape[1]
    if not -V <= ref_index < V:
        raise ValueError(f"ref_index {ref_index} out of range for {V} views")
    ref = c2w[:, ref_index]  # [B, 4, 4]
    R_ref, t_ref = ref[:, :3, :3], ref[:, :3, 3]
    R_rel = R_ref.transpose(-1, -2)[:, None] @ c2w[..., :3, :3]  # [B, V, 3, 3]
    # t_rel = R_ref^T (t_v - t_ref)
    t_rel = torch.einsum("bji,bvj->bvi", R_ref, c2w[..., :3, 3] - t_ref[:, None])  # [B, V, 3]

    dist = t_rel.norm(dim=-1)  # [B, V] distances from the reference centre
    if translation_norm == "max":
        scale = dist.amax(dim=1)
    elif translation_norm == "mean":
        scale = dist.sum(dim=1) / max(V - 1, 1)  # the reference's own distance is exactly 0
    elif translation_norm == "none":
        scale = torch.ones_like(dist[:, 0])
    else:
        raise ValueError(f"translation_norm must be 'max', 'mean' or 'none', got {translation_norm!r}")
    scale = torch.where(scale > eps, scale, torch.ones_like(scale))  # [B]

    out = torch.zeros_like(c2w)
    out[..., :3, :3] = R_rel
    out[..., :3, 3] = t_rel / scale[:, None, None]
    out[..., 3, 3] = 1
    return out


def camera_conditioning(
    K: torch.Tensor,
    c2w: torch.Tensor,
    cond_mask: torch.Tensor,
    H: int,
    W: int,
    *,
    relative: bool = True,
    ref_index: int = 0,
) -> torch.Tensor:  # [B, V, 7, H, W]
    """The 7-channel per-pixel camera signal every backbone consumes: 6 Plücker + 1 mask.

    cond_mask [B, V] is written verbatim as the 7th channel: 0 = reference (clean, given) view,
    1 = target view (the CAT3D / MVGenMaster convention). With `relative` (the default) the cameras
    are first re-expressed in the frame of view `ref_index` (references come first, so view 0) and
    translation-normalised, which makes the signal invariant to the dataset's world frame and scale.
    """
    _check("c2w", c2w, (4, 4))
    if cond_mask.shape != c2w.shape[:2]:
        raise ValueError(
            f"cond_mask must have shape [B, V] = {tuple(c2w.shape[:2])}, got {tuple(cond_mask.shape)}"
        )
    # Camera geometry stays in the input precision under autocast: bf16 matmuls would mix dtypes
    # in the cross product and blur the rays.
    with torch.autocast(device_type=c2w.device.type, enabled=False):
        if relative:
            c2w = relative_cameras(c2w, ref_index=ref_index)
        rays = plucker_rays(K, c2w, H, W)  # [B, V, 6, H, W]
    mask = cond_mask.to(rays.dtype)[:, :, None, None, None].expand(-1, -1, 1, H, W)  # [B, V, 1, H, W]
    return torch.cat([rays, mask], dim=2)


class CameraEncoder(nn.Module):
    """Strided conv stack from the pixel-resolution camera signal to a backbone's input grid.

    Follows the MVGenMaster/CAMEO recipe: a 3x3 conv, then one stride-2 3x3 conv per halving
    (channels doubling, e.g. 32 -> 64 -> 128 -> 256 for downsample 8), SiLU in between, and a
    zero-initialised last conv. Its output is added to the backbone's first conv output, so at
    initialisation the backbone behaves exactly as without cameras and training grows the signal.
    """

    def __init__(self, in_channels: int = 7, out_channels: int = 64, downsample: int = 1, hidden: int = 32):
        super().__init__()
        if downsample < 1 or downsample & (downsample - 1):
            raise ValueError(f"downsample must be a power of 2 (1, 2, 4, ...), got {downsample}")
        self.downsample = downsample
        layers: list[nn.Module] = [nn.Conv2d(in_channels, hidden, 3, padding=1), nn.SiLU()]
        channels = hidden
        for _ in range(downsample.bit_length() - 1):
            layers += [nn.Conv2d(channels, channels * 2, 3, stride=2, padding=1), nn.SiLU()]
            channels *= 2
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, C_in, H, W] -> [N, C_out, H/ds, W/ds]
        H, W = x.shape[-2:]
        if H % self.downsample or W % self.downsample:
            raise ValueError(f"camera input {H}x{W} is not divisible by downsample {self.downsample}")
        return self.out(self.body(x))
