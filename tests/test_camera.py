"""backbones.camera: Plücker rays are lines through the right pixels, relative cameras keep
correspondences intact (the CAMEO normalisation defect is shown to break them), the encoder starts
at exactly zero."""
import math

import pytest
import torch

from backbones.camera import CameraEncoder, camera_conditioning, plucker_rays, relative_cameras
from cameo_bench.geometry import reproject


def make_K(fx, fy, cx, cy):
    return torch.tensor([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=torch.float64)


def rodrigues(axis, angle_deg):
    axis = torch.as_tensor(axis, dtype=torch.float64)
    kx, ky, kz = (axis / axis.norm()).tolist()
    Kx = torch.tensor([[0, -kz, ky], [kz, 0, -kx], [-ky, kx, 0]], dtype=torch.float64)
    a = math.radians(angle_deg)
    return torch.eye(3, dtype=torch.float64) + math.sin(a) * Kx + (1 - math.cos(a)) * Kx @ Kx


def pose(R, t):
    T = torch.eye(4, dtype=torch.float64)
    T[:3, :3] = R
    T[:3, 3] = torch.as_tensor(t, dtype=torch.float64)
    return T


def world_point(x, y, d, K, c2w):
    """Pinhole back-projection written out by hand."""
    d = torch.as_tensor(d, dtype=torch.float64)
    p = torch.stack([(x - K[0, 2]) / K[0, 0] * d, (y - K[1, 2]) / K[1, 1] * d, d])
    return c2w[:3, :3] @ p + c2w[:3, 3]


def point_line_distance(X, d, m):
    """Distance of point X from the Plücker line (unit d, moment m): |X x d - m|."""
    return (torch.linalg.cross(X, d, dim=-1) - m).norm(dim=-1)


def line_line_distance(d1, m1, d2, m2):
    """Closest approach of two non-parallel Plücker lines: |d1.m2 + d2.m1| / |d1 x d2|."""
    return ((d1 * m2).sum(-1) + (d2 * m1).sum(-1)).abs() / torch.linalg.cross(d1, d2, dim=-1).norm(dim=-1)


def ray_through(K, c2w, uv):
    """Plücker ray through a sub-pixel location: shift the principal point so that (uv) becomes
    pixel (0, 0) of a 1x1 raymap."""
    K_shift = K.clone()
    K_shift[0, 2] -= uv[0]
    K_shift[1, 2] -= uv[1]
    ray = plucker_rays(K_shift[None, None], c2w[None, None], 1, 1)[0, 0, :, 0, 0]  # [6]
    return ray[:3], ray[3:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_plucker_direction_and_moment_describe_the_pixel_ray(dtype):
    K = make_K(10.0, 9.0, 3.7, 2.2)
    c2w = pose(rodrigues([1.0, 2.0, -0.5], 35.0), (0.4, -1.0, 2.0))
    H, W = 5, 6
    rays = plucker_rays(K[None, None].to(dtype), c2w[None, None].to(dtype), H, W)
    assert rays.shape == (1, 1, 6, H, W) and rays.dtype == dtype
    d, m = rays[0, 0, :3].double(), rays[0, 0, 3:].double()
    torch.testing.assert_close(d.norm(dim=0), torch.ones(H, W, dtype=torch.float64))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for y, x in [(0, 0), (4, 5), (2, 3)]:
        X1 = world_point(float(x), float(y), 0.5, K, c2w)
        X2 = world_point(float(x), float(y), 7.0, K, c2w)
        direction = (X2 - X1) / (X2 - X1).norm()
        torch.testing.assert_close(d[:, y, x], direction, atol=tol, rtol=0)
        # The moment is a property of the line: the same from the camera centre and any point on it.
        for X in (c2w[:3, 3], X1, X2):
            torch.testing.assert_close(m[:, y, x], torch.linalg.cross(X, direction), atol=tol * 10, rtol=0)


def _two_view_scene():
    """Two generic cameras looking at a bumpy surface; depth of view i written per pixel."""
    H, W = 16, 20
    K_i = make_K(18.0, 18.0, 9.5, 7.5)
    K_j = make_K(16.0, 17.0, 10.2, 7.1)
    c2w_i = pose(rodrigues([0.3, 1.0, 0.1], 20.0), (1.0, -0.5, 0.3))
    c2w_j = c2w_i @ pose(rodrigues([0.0, 1.0, 0.2], -25.0), (1.2, 0.1, 0.4))
    ys, xs = torch.meshgrid(
        torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij"
    )
    depth_i = 4.0 + 0.5 * torch.sin(xs / 3) * torch.cos(ys / 4)
    return K_i, K_j, c2w_i, c2w_j, depth_i


def _correspondences(max_points=12):
    K_i, K_j, c2w_i, c2w_j, depth_i = _two_view_scene()
    uv_j, valid = reproject(depth_i, K_i, c2w_i, K_j, c2w_j)
    pix = valid.nonzero()
    assert len(pix) > 50  # the views overlap
    pix = pix[torch.linspace(0, len(pix) - 1, max_points).long()]
    return K_i, K_j, c2w_i, c2w_j, depth_i, uv_j, pix


def _max_miss(K_i, K_j, cam_i, cam_j, depth_i, c2w_i_abs, uv_j, pix, to_frame):
    """Largest distance between the two rays of a correspondence and from each ray to the
    (frame-transformed) 3D point."""
    rays_i = plucker_rays(K_i[None, None], cam_i[None, None], *depth_i.shape)[0, 0]  # [6, H, W]
    worst = 0.0
    for y, x in pix.tolist():
        X = to_frame(world_point(float(x), float(y), depth_i[y, x], K_i, c2w_i_abs))
        d1, m1 = rays_i[:3, y, x], rays_i[3:, y, x]
        d2, m2 = ray_through(K_j, cam_j, uv_j[y, x])
        worst = max(worst, float(line_line_distance(d1, m1, d2, m2)),
                    float(point_line_distance(X, d1, m1)), float(point_line_distance(X, d2, m2)))
    return worst


def test_rays_through_corresponding_pixels_meet_at_the_point():
    K_i, K_j, c2w_i, c2w_j, depth_i, uv_j, pix = _correspondences()
    assert _max_miss(K_i, K_j, c2w_i, c2w_j, depth_i, c2w_i, uv_j, pix, lambda X: X) < 1e-5


@pytest.mark.parametrize("ref_index", [0, 1])
def test_relative_cameras_keep_correspondences(ref_index):
    K_i, K_j, c2w_i, c2w_j, depth_i, uv_j, pix = _correspondences()
    rel = relative_cameras(torch.stack([c2w_i, c2w_j])[None], ref_index=ref_index)[0]
    ref = (c2w_i, c2w_j)[ref_index]
    scale = (c2w_i[:3, 3] - c2w_j[:3, 3]).norm()  # two cameras: max distance from the reference

    def to_frame(X):  # world -> reference camera frame, then divide by the scene scale
        return (ref[:3, :3].T @ (X - ref[:3, 3])) / scale

    assert _max_miss(K_i, K_j, rel[0], rel[1], depth_i, c2w_i, uv_j, pix, to_frame) < 1e-5

    # CAMEO's released normalisation (w2c_v left-multiplied by c2w_ref) is not a change of frame:
    # the same check must fail for it, otherwise this test could not catch the defect.
    bad = [torch.linalg.inv(ref @ torch.linalg.inv(c)) for c in (c2w_i, c2w_j)]
    rays_i = plucker_rays(K_i[None, None], bad[0][None, None], *depth_i.shape)[0, 0]
    misses = []
    for y, x in pix.tolist():
        d2, m2 = ray_through(K_j, bad[1], uv_j[y, x])
        misses.append(float(line_line_distance(rays_i[:3, y, x], rays_i[3:, y, x], d2, m2)))
    assert max(misses) > 1e-2


def test_relative_cameras_are_world_frame_and_scale_invariant():
    gen = torch.Generator().manual_seed(0)
    c2w = torch.stack([
        torch.stack([pose(rodrigues(torch.randn(3, generator=gen), 40 * v + 5), torch.randn(3, generator=gen))
                     for v in range(3)])
        for _ in range(2)
    ])  # [B=2, V=3, 4, 4]
    rel = relative_cameras(c2w)
    torch.testing.assert_close(rel[:, 0], torch.eye(4, dtype=torch.float64).expand(2, 4, 4))
    torch.testing.assert_close(rel[..., :3, 3].norm(dim=-1).amax(dim=1), torch.ones(2, dtype=torch.float64))
    # Distances between camera centres are preserved up to the one scale.
    dist = (c2w[:, 1, :3, 3] - c2w[:, 2, :3, 3]).norm(dim=-1)
    dist_rel = (rel[:, 1, :3, 3] - rel[:, 2, :3, 3]).norm(dim=-1)
    scale = (c2w[:, 1:, :3, 3] - c2w[:, :1, :3, 3]).norm(dim=-1).amax(dim=1)
    torch.testing.assert_close(dist_rel, dist / scale)
    # A different world frame and unit (rigid G, then scale 3.7) gives the same relative cameras.
    world = pose(rodrigues([1.0, -1.0, 0.5], 70.0), (5.0, -2.0, 1.0))
    moved = world @ c2w
    moved[..., :3, 3] *= 3.7
    torch.testing.assert_close(relative_cameras(moved), rel)
    mean_rel = relative_cameras(c2w, translation_norm="mean")
    mean_dist = mean_rel[:, 1:, :3, 3].norm(dim=-1).mean(dim=1)
    torch.testing.assert_close(mean_dist, torch.ones(2, dtype=torch.float64))
    # All cameras at one centre: no division by zero, translations stay zero.
    same = c2w.clone()
    same[..., :3, 3] = 1.0
    out = relative_cameras(same)
    assert torch.isfinite(out).all() and out[..., :3, 3].abs().max() == 0


def test_camera_conditioning_layout():
    B, V, H, W = 2, 3, 4, 5
    K = make_K(6.0, 6.0, 2.0, 1.5).expand(B, V, 3, 3).float()
    c2w = torch.stack([pose(rodrigues([0, 1, 0], 10.0 * v), (0.5 * v, 0.0, 0.0)) for v in range(V)])
    c2w = c2w.expand(B, V, 4, 4).float()
    cond_mask = torch.tensor([[0, 1, 1], [0, 0, 1]])
    cond = camera_conditioning(K, c2w, cond_mask, H, W)
    assert cond.shape == (B, V, 7, H, W) and cond.dtype == torch.float32
    torch.testing.assert_close(cond[:, :, 6], cond_mask.float()[:, :, None, None].expand(B, V, H, W))
    # The reference camera sits at the origin of the relative frame: zero moments, and its
    # directions are the normalised camera-frame pixel rays.
    assert cond[:, 0, 3:6].abs().max() < 1e-6
    u = (torch.arange(W) - 2.0) / 6.0
    v = (torch.arange(H) - 1.5) / 6.0
    ray = torch.stack([u.expand(H, W), v[:, None].expand(H, W), torch.ones(H, W)])
    torch.testing.assert_close(cond[0, 0, :3], ray / ray.norm(dim=0))
    with pytest.raises(ValueError, match="cond_mask"):
        camera_conditioning(K, c2w, cond_mask[:, :2], H, W)


@pytest.mark.parametrize("downsample", [1, 2, 8])
def test_camera_encoder_starts_at_zero_and_learns(downsample):
    enc = CameraEncoder(in_channels=7, out_channels=12, downsample=downsample, hidden=8)
    x = torch.randn(3, 7, 16, 24)
    out = enc(x)
    assert out.shape == (3, 12, 16 // downsample, 24 // downsample)
    assert torch.equal(out, torch.zeros_like(out))
    (out * torch.randn_like(out)).sum().backward()
    assert enc.out.weight.grad.abs().sum() > 0  # the zero conv still receives gradient


def test_camera_encoder_rejects_bad_sizes():
    with pytest.raises(ValueError, match="power of 2"):
        CameraEncoder(out_channels=4, downsample=3)
    enc = CameraEncoder(out_channels=4, downsample=4, hidden=4)
    with pytest.raises(ValueError, match="divisible"):
        enc(torch.zeros(1, 7, 10, 12))


def test_camera_conditioning_under_bf16_autocast_stays_fp32():
    """Autocast must not turn the ray geometry into bf16 (the cross product then mixes dtypes)."""
    from backbones.camera import camera_conditioning

    K = torch.tensor([[8.0, 0, 3.5], [0, 8.0, 3.5], [0, 0, 1]]).expand(1, 2, 3, 3)
    c2w = torch.eye(4).repeat(1, 2, 1, 1)
    c2w[0, 1, 0, 3] = 1.0
    plain = camera_conditioning(K, c2w, torch.tensor([[0.0, 1.0]]), 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = camera_conditioning(K, c2w, torch.tensor([[0.0, 1.0]]), 8, 8)
    assert auto.dtype == torch.float32 and torch.equal(plain, auto)
