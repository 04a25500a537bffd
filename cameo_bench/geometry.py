"""Camera conventions and the pixel-level geometry every correspondence source builds on.

One convention, everywhere (converters translate foreign ones once, at load time):
  * OpenCV camera axes: x right, y down, z forward.
  * `c2w` is a rigid camera-to-world 4x4; `K` is in pixels of the stored image.
  * The centre of the top-left pixel is (u, v) = (0, 0); pixel (row y, column x) has centre (x, y).
    Pixel x therefore covers u in [x - 0.5, x + 0.5).
  * Depth is z-depth (distance along the optical axis, not along the ray); 0 or non-finite = invalid.

Camera tensors may carry leading batch dimensions; they align with the *leading* dimensions of the
per-pixel / per-point tensors (e.g. depth [B, H, W] with K [B, 3, 3]). Everything works in float32
and float64; inputs are promoted to the widest floating dtype among them.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

__all__ = [
    "pixel_grid",
    "invert_rigid",
    "unproject",
    "project",
    "relative_pose",
    "reproject",
    "look_at",
    "orbit_cam2world",
    "rotation_angle_deg",
    "scale_intrinsics",
    "crop_intrinsics",
]

# Points with camera-frame z at or below this are "behind" the camera: projecting them is
# meaningless, and near z = 0 the division would blow up.
MIN_DEPTH = 1e-6


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    return torch.as_tensor(x)


def _float_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Widest floating dtype among the inputs (float32 if none is floating)."""
    dtype = torch.float32
    for t in tensors:
        if t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _check_matrix(name: str, m: torch.Tensor, size: int) -> None:
    if m.ndim < 2 or m.shape[-2:] != (size, size):
        raise ValueError(f"{name} must have shape [..., {size}, {size}], got {tuple(m.shape)}")


def _align(camera: torch.Tensor, data_ndim: int) -> torch.Tensor:
    """View a [*batch, r, c] camera matrix as [*batch, 1, ..., 1, r, c] so that its batch dims line
    up with the leading dims of a tensor whose non-matrix part has `data_ndim` dims."""
    batch = camera.shape[:-2]
    extra = data_ndim - len(batch)
    if extra < 0:
        raise ValueError(
            f"camera batch shape {tuple(batch)} has more dims than the data it applies to ({data_ndim})"
        )
    return camera.reshape(*batch, *([1] * extra), *camera.shape[-2:])


def pixel_grid(
    H: int, W: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:  # [H, W, 2] as (u, v) = (column, row)
    """Pixel-centre coordinates in the integer-centre convention (top-left centre at (0, 0))."""
    v, u = torch.meshgrid(
        torch.arange(H, dtype=dtype, device=device),
        torch.arange(W, dtype=dtype, device=device),
        indexing="ij",
    )
    return torch.stack([u, v], dim=-1)


def invert_rigid(c2w: torch.Tensor) -> torch.Tensor:  # [..., 4, 4]
    """Exact inverse of a rigid transform ([R | t] -> [R^T | -R^T t]); better conditioned than a
    general 4x4 inverse, and the convention guarantees poses are rigid."""
    _check_matrix("c2w", c2w, 4)
    R = c2w[..., :3, :3]
    t = c2w[..., :3, 3:]
    Rt = R.transpose(-1, -2)
    out = torch.zeros_like(c2w)
    out[..., :3, :3] = Rt
    out[..., :3, 3:] = -Rt @ t
    out[..., 3, 3] = 1
    return out


def _transform(T: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Apply 4x4 transforms (batch dims aligned to the leading dims of points) to [..., 3] points."""
    T = _align(T, points.ndim - 1)
    return (T[..., :3, :3] @ points[..., None])[..., 0] + T[..., :3, 3]


def unproject(depth, K, c2w) -> torch.Tensor:  # [..., H, W, 3] world points
    """Lift every pixel centre with its z-depth to the world frame. Invalid depths give
    non-finite or meaningless points; callers mask them with their own validity test."""
    depth, K, c2w = _as_tensor(depth), _as_tensor(K), _as_tensor(c2w)
    _check_matrix("K", K, 3)
    _check_matrix("c2w", c2w, 4)
    if depth.ndim < 2:
        raise ValueError(f"depth must have shape [..., H, W], got {tuple(depth.shape)}")
    dtype = _float_dtype(depth, K, c2w)
    depth, K, c2w = depth.to(dtype), K.to(dtype), c2w.to(dtype)
    H, W = depth.shape[-2:]
    uv1 = torch.cat(
        [pixel_grid(H, W, dtype, depth.device), torch.ones(H, W, 1, dtype=dtype, device=depth.device)],
        dim=-1,
    )  # [H, W, 3]
    K_inv = _align(torch.linalg.inv(K), depth.ndim)  # [..., 1, 1, 3, 3]
    rays = (K_inv @ uv1[..., None])[..., 0]  # [..., H, W, 3], z = 1
    points_cam = rays * depth[..., None]  # [..., H, W, 3]
    return _transform(c2w, points_cam)


def project(points_world, K, c2w) -> tuple[torch.Tensor, torch.Tensor]:
    """World points [..., 3] -> (uv [..., 2] pixels, z [...] camera z-depth). uv is not guarded:
    where z <= 0 it is meaningless, so callers must test z."""
    points_world, K, c2w = _as_tensor(points_world), _as_tensor(K), _as_tensor(c2w)
    _check_matrix("K", K, 3)
    _check_matrix("c2w", c2w, 4)
    dtype = _float_dtype(points_world, K, c2w)
    points_world, K, c2w = points_world.to(dtype), K.to(dtype), c2w.to(dtype)
    points_cam = _transform(invert_rigid(c2w), points_world)  # [..., 3]
    return _project_cam(points_cam, K)


def _project_cam(points_cam: torch.Tensor, K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = points_cam[..., 2]
    hom = (_align(K, points_cam.ndim - 1) @ points_cam[..., None])[..., 0]  # [..., 3]
    return hom[..., :2] / z[..., None], z


def relative_pose(c2w_i, c2w_j) -> torch.Tensor:  # [..., 4, 4]
    """T_ji = inv(c2w_j) @ c2w_i: maps camera-i coordinates to camera-j coordinates."""
    c2w_i, c2w_j = _as_tensor(c2w_i), _as_tensor(c2w_j)
    dtype = _float_dtype(c2w_i, c2w_j)
    return invert_rigid(c2w_j.to(dtype)) @ c2w_i.to(dtype)


def _valid_depth(depth: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(depth) & (depth > 0)


def reproject(
    depth_i,
    K_i,
    c2w_i,
    K_j,
    c2w_j,
    depth_j=None,
    rel_tol: float = 0.02,
    *,
    image_size_j: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each pixel of view i lands in view j, and whether that landing is a true correspondence.

    depth_i [..., H, W] (z-depth of view i); K_* [..., 3, 3]; c2w_* [..., 4, 4]; optional
    depth_j [..., H_j, W_j]. Returns uv_j [..., H, W, 2] (pixels of view j; zero where invalid) and
    valid [..., H, W] bool. A pixel is invalid when
      * depth_i is 0, negative or non-finite;
      * the point is behind camera j (z_j <= MIN_DEPTH);
      * it falls outside image j: kept iff -0.5 <= u < W_j - 0.5 and -0.5 <= v < H_j - 0.5, i.e. it
        lies inside some pixel's footprint (so nearest-pixel lookup is always in range);
      * depth_j is given and the point is occluded or lands on missing depth:
        |z_j - D_j(u, v)| > rel_tol * D_j(u, v). D_j is sampled bilinearly in *inverse* depth (1/z is
        affine in (u, v) on a plane, so planes are reproduced exactly) and the test fails if any
        bilinear neighbour with non-zero weight has invalid depth (silhouettes, holes). In the outer
        half-pixel band the sampling position is clamped to the border pixel centres.
    The image size of view j comes from depth_j, else `image_size_j` (H_j, W_j), else view i's size.
    Numpy inputs are accepted; the outputs are torch tensors.
    """
    depth_i = _as_tensor(depth_i)
    K_i, c2w_i, K_j, c2w_j = (_as_tensor(x) for x in (K_i, c2w_i, K_j, c2w_j))
    for name, m, size in (("K_i", K_i, 3), ("c2w_i", c2w_i, 4), ("K_j", K_j, 3), ("c2w_j", c2w_j, 4)):
        _check_matrix(name, m, size)
    if depth_i.ndim < 2:
        raise ValueError(f"depth_i must have shape [..., H, W], got {tuple(depth_i.shape)}")
    tensors = [depth_i, K_i, c2w_i, K_j, c2w_j]
    if depth_j is not None:
        depth_j = _as_tensor(depth_j)
        if depth_j.ndim != depth_i.ndim:
            raise ValueError(
                f"depth_j {tuple(depth_j.shape)} must have the same number of dims as depth_i "
                f"{tuple(depth_i.shape)}"
            )
        tensors.append(depth_j)
    dtype = _float_dtype(*tensors)
    depth_i, K_i, c2w_i, K_j, c2w_j = (t.to(dtype) for t in (depth_i, K_i, c2w_i, K_j, c2w_j))

    if depth_j is not None:
        H_j, W_j = depth_j.shape[-2:]
    elif image_size_j is not None:
        H_j, W_j = image_size_j
    else:
        H_j, W_j = depth_i.shape[-2:]

    valid_i = _valid_depth(depth_i)  # [..., H, W]
    safe_depth = torch.where(valid_i, depth_i, torch.ones_like(depth_i))
    H, W = depth_i.shape[-2:]
    uv1 = torch.cat(
        [pixel_grid(H, W, dtype, depth_i.device), torch.ones(H, W, 1, dtype=dtype, device=depth_i.device)],
        dim=-1,
    )  # [H, W, 3]
    points_i = (_align(torch.linalg.inv(K_i), depth_i.ndim) @ uv1[..., None])[..., 0]
    points_i = points_i * safe_depth[..., None]  # [..., H, W, 3] in camera i
    # Going straight from camera i to camera j (one composed transform) keeps float32 error small.
    points_j = _transform(relative_pose(c2w_i, c2w_j), points_i)  # [..., H, W, 3] in camera j
    z_j = points_j[..., 2]
    in_front = z_j > MIN_DEPTH
    uv_j, _ = _project_cam(torch.where(in_front[..., None], points_j, torch.ones_like(points_j)), K_j)
    u, v = uv_j[..., 0], uv_j[..., 1]
    inside = (u >= -0.5) & (u < W_j - 0.5) & (v >= -0.5) & (v < H_j - 0.5)
    valid = valid_i & in_front & inside

    if depth_j is not None:
        depth_j = depth_j.to(dtype)
        sampled, neighbours_ok = _sample_inverse_depth(depth_j, uv_j)
        visible = neighbours_ok & ((z_j - sampled).abs() <= rel_tol * sampled)
        valid = valid & visible

    uv_j = torch.where(valid[..., None], uv_j, torch.zeros_like(uv_j))
    return uv_j, valid


def _sample_inverse_depth(depth: torch.Tensor, uv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear depth lookup through inverse depth.

    depth [..., Hj, Wj], uv [..., H, W, 2] (same leading dims, or broadcastable to them). Returns
    (depth [..., H, W], ok [..., H, W]) where ok is False when any neighbour carrying weight is invalid.
    """
    Hj, Wj = depth.shape[-2:]
    lead = torch.broadcast_shapes(depth.shape[:-2], uv.shape[:-3])
    depth = depth.expand(*lead, Hj, Wj).reshape(-1, Hj * Wj)  # [L, Hj*Wj]
    uv = uv.expand(*lead, *uv.shape[-3:])
    H, W = uv.shape[-3:-1]
    uv = uv.reshape(-1, H * W, 2)  # [L, P, 2]

    ok_map = _valid_depth(depth)
    safe = torch.where(ok_map, depth, torch.ones_like(depth))
    inv = torch.where(ok_map, 1.0 / safe, torch.zeros_like(depth))  # [L, Hj*Wj]

    u = uv[..., 0].clamp(0, Wj - 1)
    v = uv[..., 1].clamp(0, Hj - 1)
    x0 = u.floor().clamp(max=Wj - 1)
    y0 = v.floor().clamp(max=Hj - 1)
    fx, fy = u - x0, v - y0  # in [0, 1)
    x0, y0 = x0.long(), y0.long()
    x1 = (x0 + 1).clamp(max=Wj - 1)
    y1 = (y0 + 1).clamp(max=Hj - 1)

    value = torch.zeros_like(u)
    ok = torch.ones_like(u, dtype=torch.bool)
    for yy, xx, weight in (
        (y0, x0, (1 - fx) * (1 - fy)),
        (y0, x1, fx * (1 - fy)),
        (y1, x0, (1 - fx) * fy),
        (y1, x1, fx * fy),
    ):
        idx = yy * Wj + xx  # [L, P]
        value = value + weight * torch.gather(inv, 1, idx)
        ok = ok & (torch.gather(ok_map, 1, idx) | (weight == 0))

    ok = ok & (value > 0)
    sampled = torch.where(ok, 1.0 / torch.where(ok, value, torch.ones_like(value)), torch.zeros_like(value))
    return sampled.reshape(*lead, H, W), ok.reshape(*lead, H, W)


def look_at(eye, target, up: Sequence[float] | torch.Tensor = (0.0, 0.0, 1.0)) -> torch.Tensor:
    """OpenCV camera-to-world [..., 4, 4] at `eye` looking at `target`.

    `up` is the world direction that should appear towards the TOP of the image (smaller v). The
    default is a z-up world (gravity along -z), the frame the synthetic scenes use. Because the
    OpenCV camera y axis points down the image, the camera's y axis is built from -up: getting
    this sign wrong gives upside-down cameras that are still self-consistent, which is why the
    tests check that a point above the scene projects above the image centre.
    Raises when the viewing direction is parallel to `up`.
    """
    eye = _as_tensor(eye)
    target = _as_tensor(target)
    up = _as_tensor(up)
    dtype = _float_dtype(eye, target, up)
    eye, target, up = eye.to(dtype), target.to(dtype), up.to(device=eye.device, dtype=dtype)
    eye, target, up = torch.broadcast_tensors(eye, target, up)
    z = target - eye  # forward
    z = z / z.norm(dim=-1, keepdim=True)
    x = torch.linalg.cross(z, up)  # right = forward x up (x = y x z with y = down)
    x_norm = x.norm(dim=-1, keepdim=True)
    if bool((x_norm < 1e-8 * up.norm(dim=-1, keepdim=True)).any()):
        raise ValueError("look_at: viewing direction is parallel to the up vector")
    x = x / x_norm
    y = torch.linalg.cross(z, x)  # down
    c2w = torch.zeros(*eye.shape[:-1], 4, 4, dtype=dtype, device=eye.device)
    c2w[..., :3, 0] = x
    c2w[..., :3, 1] = y
    c2w[..., :3, 2] = z
    c2w[..., :3, 3] = eye
    c2w[..., 3, 3] = 1
    return c2w


def orbit_cam2world(
    azimuth_deg,
    elevation_deg,
    radius,
    target: Sequence[float] | torch.Tensor = (0.0, 0.0, 0.0),
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:  # [..., 4, 4]
    """Cameras on a sphere around `target` in a z-up world, looking at it.

    Azimuth is measured in the xy plane from +x towards +y; elevation is the angle above the xy
    plane (positive = looking down at the scene). Arguments broadcast against each other.
    """
    az = torch.as_tensor(azimuth_deg, dtype=dtype) * (math.pi / 180)
    el = torch.as_tensor(elevation_deg, dtype=dtype) * (math.pi / 180)
    r = torch.as_tensor(radius, dtype=dtype)
    az, el, r = torch.broadcast_tensors(az, el, r)
    target = torch.as_tensor(target, dtype=dtype)
    offset = torch.stack([el.cos() * az.cos(), el.cos() * az.sin(), el.sin()], dim=-1) * r[..., None]
    eye = target + offset
    return look_at(eye, target.expand_as(eye), up=torch.tensor([0.0, 0.0, 1.0], dtype=dtype))


def rotation_angle_deg(c2w_i, c2w_j) -> torch.Tensor:  # [...]
    """Angle of the relative rotation R_j^T R_i in degrees (the viewpoint-change bin variable).

    atan2 of the rotation's sine and cosine parts stays accurate near 0 and 180 degrees, where
    acos((trace - 1) / 2) loses precision.
    """
    c2w_i, c2w_j = _as_tensor(c2w_i), _as_tensor(c2w_j)
    dtype = _float_dtype(c2w_i, c2w_j)
    R = c2w_j[..., :3, :3].to(dtype).transpose(-1, -2) @ c2w_i[..., :3, :3].to(dtype)
    cos2 = R[..., 0, 0] + R[..., 1, 1] + R[..., 2, 2] - 1  # 2 cos(theta)
    sin2 = torch.stack(
        [R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0], R[..., 1, 0] - R[..., 0, 1]], dim=-1
    ).norm(dim=-1)  # 2 sin(theta)
    return torch.rad2deg(torch.atan2(sin2, cos2))


def scale_intrinsics(K, sx: float, sy: float | None = None) -> torch.Tensor:
    """Intrinsics after resizing the image by (sx, sy) (new size / old size).

    With integer pixel centres the pixel *edges* scale, not the centres: a pixel edge at
    c + 0.5 maps to s (c + 0.5), hence f' = s f and c' = s (c + 0.5) - 0.5.
    """
    K = _as_tensor(K)
    _check_matrix("K", K, 3)
    sy = sx if sy is None else sy
    dtype = _float_dtype(K)
    S = torch.tensor(
        [[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]], dtype=dtype, device=K.device
    )
    return S @ K.to(dtype)


def crop_intrinsics(K, x0: float, y0: float) -> torch.Tensor:
    """Intrinsics after cropping so that pixel (x0, y0) becomes the new top-left pixel."""
    K = _as_tensor(K)
    _check_matrix("K", K, 3)
    K = K.to(_float_dtype(K)).clone()
    K[..., 0, 2] -= x0
    K[..., 1, 2] -= y0
    return K
