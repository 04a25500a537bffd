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
    """0 < depth < inf: the same set as `isfinite & > 0` (NaN fails both comparisons) in three
    cheap ops instead of the five `isfinite` expands to."""
    return (depth > 0) & (depth < math.inf)


def _rows(M: torch.Tensor, data_ndim: int, num_rows: int | None = None) -> list[list[torch.Tensor]]:
    """Entries M[r][c] of [*batch, rows, cols] matrices, each shaped to broadcast against a
    per-pixel component of `data_ndim` dims (camera batch dims aligned to the leading ones)."""
    M = _align(M, data_ndim)
    return [[M[..., r, c] for c in range(M.shape[-1])] for r in range(num_rows or M.shape[-2])]


def _affine(M: list[list[torch.Tensor]], x, y, z, translation: bool = False) -> list[torch.Tensor]:
    """Rows of M @ (x, y, z) (+ the fourth column when `translation`), one component per row.

    Written out per component on [..., H, W] tensors rather than as batched [3, 3] @ [3, 1]
    matmuls on an interleaved [..., H, W, 3] layout, which cost several times more at these sizes.
    The sum runs left to right without fused multiply-add, as the matmul kernels do for a 3-term
    product, so the results equal `_transform` / `_project_cam` bit for bit.
    """
    out = []
    for row in M:
        acc = row[0] * x + row[1] * y + row[2] * z
        out.append(acc + row[3] if translation else acc)
    return out


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
    Leading dims broadcast, so all V x V view pairs are one call: depth_i [B, V, 1, H, W] with
    cameras i [B, V, 1, ...], cameras j [B, 1, V, ...] and depth_j [B, 1, V, H_j, W_j]; each
    distinct depth_j map is then prepared once for the occlusion test, not once per pair.
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

    # Per-pixel work runs on separate x / y / z components [..., H, W]; camera entries broadcast in.
    nd = depth_i.ndim
    H, W = depth_i.shape[-2:]
    valid_i = _valid_depth(depth_i)  # [..., H, W]
    safe_depth = torch.where(valid_i, depth_i, 1.0)
    u_i = torch.arange(W, dtype=dtype, device=depth_i.device).expand(H, W)  # [H, W] pixel centres
    v_i = torch.arange(H, dtype=dtype, device=depth_i.device)[:, None].expand(H, W)
    ray = _affine(_rows(torch.linalg.inv(K_i), nd), u_i, v_i, 1.0)  # 3 x [..., H, W], z = 1
    points_i = [c * safe_depth for c in ray]  # camera i
    # Going straight from camera i to camera j (one composed transform) keeps float32 error small.
    x_j, y_j, z_j = _affine(_rows(relative_pose(c2w_i, c2w_j), nd, 3), *points_i, translation=True)
    in_front = z_j > MIN_DEPTH
    # Only z needs guarding, and only where the pixel is invalid anyway (z_j <= MIN_DEPTH).
    z_safe = z_j.clamp(min=MIN_DEPTH)
    hx, hy = _affine(_rows(K_j, nd, 2), x_j, y_j, z_safe)
    u, v = hx / z_safe, hy / z_safe  # [..., H, W] pixels of view j
    inside = (u >= -0.5) & (u < W_j - 0.5) & (v >= -0.5) & (v < H_j - 0.5)
    valid = valid_i & in_front & inside

    if depth_j is not None:
        inverse, lowest = _sample_inverse_depth(depth_j.to(dtype), u, v)
        sampled = inverse.reciprocal()  # D_j(u, v)
        # lowest >= 0: no weighted neighbour is invalid. The inverse is then > 0 as well: some
        # weight is >= 1/4 and a valid inverse depth is >= 1 / float max.
        valid = valid & (lowest >= 0) & ((z_j - sampled).abs() <= rel_tol * sampled)

    # Filling the two channels of a preallocated [..., 2] is ~3x cheaper than stacking on the last
    # dim, and slice assignment (unlike `out=`) keeps uv_j differentiable.
    uv_j = torch.empty(*valid.shape, 2, dtype=dtype, device=depth_i.device)
    uv_j[..., 0] = torch.where(valid, u, 0.0)
    uv_j[..., 1] = torch.where(valid, v, 0.0)
    return uv_j, valid


def _shared_maps(depth: torch.Tensor) -> torch.Tensor:
    """Drop the copies of an expanded (stride-0) leading dim, so per-map work runs once per map."""
    index = tuple(
        slice(0, 1) if stride == 0 and size > 1 else slice(None)
        for size, stride in zip(depth.shape[:-2], depth.stride()[:-2])
    )
    return depth[index]


def _signed_inverse(depth: torch.Tensor) -> torch.Tensor:
    """1 / depth where the depth is valid, a number in [-4, -4/3] where it is not.

    Arithmetic only (comparisons and `where` are several times slower on CPU): non-finite -> -1,
    clamp to >= -1/4, then add (sign(d) - 1) / 4, which is exactly 0 for d > 0 (valid depths are
    kept to the bit) and moves [-1/4, 0] to [-3/4, -1/4]. The invalid marker's magnitude is >= 1
    so that even the smallest non-zero bilinear weight times it stays negative (no underflow to
    -0). A tiny positive depth whose inverse overflows stays +inf, as 1 / depth gives.
    """
    d = torch.nan_to_num(depth, nan=-1.0, posinf=-1.0, neginf=-1.0).clamp(min=-0.25)
    return torch.add(d, d.sign() - 1, alpha=0.25).reciprocal()


def _sample_inverse_depth(
    depth: torch.Tensor, u: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear lookup of inverse depth: depth [..., Hj, Wj] at u / v [..., H, W] (leading dims
    broadcast against each other) -> (inverse depth [..., H, W], lowest [..., H, W]).

    The lookup is only meaningful where lowest >= 0, i.e. no neighbour that carries weight has
    invalid depth. Inverse depth is prepared once per distinct map, before any broadcasting to the
    sample points, with a negative marker on invalid pixels (`_signed_inverse`); so each product
    weight * inverse depth is >= 0 exactly when its neighbour is valid or has zero weight (it then
    adds -0 or +0, and the sum equals a zero-filled bilinear sum), and `lowest`, the smallest of
    the four products, carries the whole validity test in float ops. The four neighbours are flat
    index_selects into the prepared maps.
    """
    depth = _shared_maps(depth)
    Hj, Wj = depth.shape[-2:]
    lead = torch.broadcast_shapes(depth.shape[:-2], u.shape[:-2])
    maps = depth.reshape(-1, Hj * Wj)  # [L, Hj*Wj]
    inv = _signed_inverse(maps).reshape(-1)  # [L*Hj*Wj]
    index_dtype = torch.int32 if inv.numel() < 2**31 else torch.int64

    # nan_to_num: a NaN position (only from non-finite inputs) must still index inside the map.
    u = torch.nan_to_num(u, nan=0.0).clamp(0, Wj - 1)
    v = torch.nan_to_num(v, nan=0.0).clamp(0, Hj - 1)
    x0, y0 = u.floor(), v.floor()
    fx, fy = u - x0, v - y0  # in [0, 1)
    x1, y1 = (x0 + 1).clamp(max=Wj - 1), (y0 + 1).clamp(max=Hj - 1)
    x0, x1 = x0.to(index_dtype), x1.to(index_dtype)
    base = torch.arange(maps.shape[0], dtype=index_dtype, device=depth.device) * (Hj * Wj)
    base = base.reshape(*depth.shape[:-2], 1, 1)  # first pixel of each map
    row0 = y0.to(index_dtype) * Wj + base  # [..., H, W]
    row1 = y1.to(index_dtype) * Wj + base
    gx, gy = 1 - fx, 1 - fy

    value = lowest = None
    neighbours = ((row0, x0, gx * gy), (row0, x1, fx * gy), (row1, x0, gx * fy), (row1, x1, fx * fy))
    for row, col, weight in neighbours:
        index = row + col
        term = weight * inv.index_select(0, index.reshape(-1)).reshape(index.shape)
        value = term if value is None else value + term
        lowest = term if lowest is None else torch.minimum(lowest, term)
    shape = (*lead, *u.shape[-2:])
    return value.reshape(shape), lowest.reshape(shape)


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
