"""cameo_bench.geometry against closed-form geometry (disparity, homographies, analytic scenes).

Every expected value here is derived by hand in the test (pinhole formulas written out, Rodrigues
rotations, naive per-pixel loops), never by calling the function under test a second time.
"""
import math

import numpy as np
import pytest
import torch

from cameo_bench import geometry as G
def make_K(fx, fy, cx, cy, dtype=torch.float64):
    return torch.tensor([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=dtype)


def rodrigues(axis, angle_deg, dtype=torch.float64):
    axis = torch.as_tensor(axis, dtype=dtype)
    axis = axis / axis.norm()
    a = math.radians(angle_deg)
    kx, ky, kz = axis.tolist()
    Kx = torch.tensor([[0, -kz, ky], [kz, 0, -kx], [-ky, kx, 0]], dtype=dtype)
    return torch.eye(3, dtype=dtype) + math.sin(a) * Kx + (1 - math.cos(a)) * Kx @ Kx


def pose(R=None, t=(0.0, 0.0, 0.0), dtype=torch.float64):
    T = torch.eye(4, dtype=dtype)
    if R is not None:
        T[:3, :3] = R
    T[:3, 3] = torch.as_tensor(t, dtype=dtype)
    return T


def random_pose(gen, dtype=torch.float64):
    axis = torch.randn(3, generator=gen, dtype=dtype)
    angle = float(torch.rand(1, generator=gen)) * 120 - 60
    return pose(rodrigues(axis, angle, dtype), torch.randn(3, generator=gen, dtype=dtype), dtype)


def pixel_point_world(x, y, d, K, c2w):
    """Hand-written pinhole back-projection of pixel centre (x, y) at z-depth d."""
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    p_cam = torch.stack([(x - cx) / fx * d, (y - cy) / fy * d, torch.as_tensor(d, dtype=K.dtype)])
    return c2w[:3, :3] @ p_cam + c2w[:3, 3]


# ------------------------------------------------------------------------------------------------
# reproject: analytic scenes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fronto_parallel_disparity_and_sign(dtype):
    """Camera j moved by +b along x sees a plane at depth Z shifted by -f b / Z pixels."""
    H, W, f, Z = 6, 16, 8.0, 2.0
    K = make_K(f, f, 7.5, 2.5, dtype)
    baselines = [0.3125, 1.0]  # disparities 1.25 and 4.0 px (no pixel lands on a bound)
    depth = torch.full((2, H, W), Z, dtype=dtype)
    c2w_i = torch.eye(4, dtype=dtype).expand(2, 4, 4)
    c2w_j = torch.stack([pose(t=(b, 0.0, 0.0), dtype=dtype) for b in baselines])
    # A shared rigid change of world frame must not change anything.
    world = random_pose(torch.Generator().manual_seed(3), dtype)
    uv, valid = G.reproject(depth, K, world @ c2w_i, K, world @ c2w_j, depth_j=depth)

    u = torch.arange(W, dtype=dtype).expand(H, W)
    v = torch.arange(H, dtype=dtype)[:, None].expand(H, W)
    for n, b in enumerate(baselines):
        disparity = f * b / Z
        expected_u = u - disparity  # moved right => content moves left
        expected_valid = expected_u >= -0.5
        assert torch.equal(valid[n], expected_valid)
        tol = 1e-4 if dtype == torch.float32 else 1e-10
        got_u = uv[n][..., 0][expected_valid]
        torch.testing.assert_close(got_u, expected_u[expected_valid], atol=tol, rtol=0)
        torch.testing.assert_close(uv[n][..., 1][expected_valid], v[expected_valid], atol=tol, rtol=0)
    assert uv.dtype == dtype


def test_image_bounds_are_half_open_at_half_pixels():
    H, W, f, Z = 4, 16, 8.0, 2.0
    K = make_K(f, f, 7.5, 1.5)
    depth = torch.full((H, W), Z, dtype=torch.float64)
    # +x baseline: u_j = u - 1.5, so u = 1 lands exactly on -0.5 (inside), u = 0 on -1.5.
    _, valid = G.reproject(depth, K, torch.eye(4, dtype=torch.float64), K, pose(t=(0.375, 0, 0)))
    assert not valid[:, 0].any() and valid[:, 1:].all()
    # -x baseline: u_j = u + 1.5, so u = W-2 lands exactly on W-0.5 (outside), u = W-3 inside.
    _, valid = G.reproject(depth, K, torch.eye(4, dtype=torch.float64), K, pose(t=(-0.375, 0, 0)))
    assert valid[:, : W - 2].all() and not valid[:, W - 2 :].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pure_rotation_is_the_infinite_homography(dtype):
    gen = torch.Generator().manual_seed(0)
    H, W = 12, 16
    K_i = make_K(14.0, 13.0, 7.2, 5.9, dtype)
    K_j = make_K(11.0, 12.5, 8.1, 5.4, dtype)
    c2w_i = random_pose(gen).to(dtype)
    c2w_j = c2w_i.clone()
    c2w_j[:3, :3] = c2w_i[:3, :3] @ rodrigues([0.3, 1.0, 0.2], 12.0).to(dtype)  # same centre
    depth = (torch.rand(H, W, generator=gen, dtype=torch.float64) * 5 + 0.5).to(dtype)
    uv, valid = G.reproject(depth, K_i, c2w_i, K_j, c2w_j)

    R_ji = (c2w_j[:3, :3].T @ c2w_i[:3, :3]).double()
    Hmat = K_j.double() @ R_ji @ torch.linalg.inv(K_i.double())
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    hom = torch.stack([xs, ys, torch.ones_like(xs)], -1).double() @ Hmat.T  # [H, W, 3]
    expected = hom[..., :2] / hom[..., 2:]
    expected_valid = (
        (hom[..., 2] > 0)
        & (expected[..., 0] >= -0.5) & (expected[..., 0] < W - 0.5)
        & (expected[..., 1] >= -0.5) & (expected[..., 1] < H - 0.5)
    )
    assert expected_valid.float().mean() > 0.4 and not expected_valid.all()  # a meaningful test
    assert torch.equal(valid, expected_valid)
    tol = 2e-4 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(uv[valid].double(), expected[valid], atol=tol, rtol=0)


def _stereo_with_occluder(bg_disp, occ_disp):
    """Plane at Z_bg plus a fronto-parallel square at Z_occ, seen by camera i at the origin and
    camera j at (+b, 0, 0). The square covers columns 6..9 / rows 3..6 in view j; in view i it
    sits occ_disp pixels further right. Depths are written per pixel from the pinhole formula."""
    H, W, f = 10, 20, 8.0
    K = make_K(f, f, 9.5, 4.5)
    Z_bg = 4.0
    b = bg_disp * Z_bg / f
    Z_occ = f * b / occ_disp
    rows = slice(3, 7)
    depth_j = torch.full((H, W), Z_bg, dtype=torch.float64)
    depth_j[rows, 6:10] = Z_occ
    depth_i = torch.full((H, W), Z_bg, dtype=torch.float64)
    shift = int(occ_disp)
    assert shift == occ_disp
    depth_i[rows, 6 + shift : 10 + shift] = Z_occ
    return K, depth_i, depth_j, pose(t=(b, 0.0, 0.0)), f, b


@pytest.mark.parametrize("bg_disp", [2.0, 2.5])
def test_occluder_hides_exactly_the_pixels_it_covers(bg_disp):
    K, depth_i, depth_j, c2w_j, f, b = _stereo_with_occluder(bg_disp, occ_disp=4.0)
    H, W = depth_i.shape
    _, valid = G.reproject(depth_i, K, torch.eye(4, dtype=torch.float64), K, c2w_j, depth_j=depth_j)

    # Naive reference: per pixel, target column u_t = x - f b / Z; in bounds iff u_t >= -0.5; visible
    # iff every pixel that bilinear sampling touches (floor and ceil of the clamped u_t) has the same
    # depth as the point.
    expected = torch.zeros(H, W, dtype=torch.bool)
    for y in range(H):
        for x in range(W):
            Z = float(depth_i[y, x])
            u_t = x - f * b / Z
            if u_t < -0.5:
                continue
            u_c = min(max(u_t, 0.0), W - 1)
            touched = {math.floor(u_c), math.ceil(u_c)}
            expected[y, x] = all(abs(float(depth_j[y, n]) - Z) < 1e-9 for n in touched)
    assert torch.equal(valid, expected)
    # The hidden set is what the square covers in j, seen from i: background pixels whose target
    # falls on (or, at fractional disparity, next to) the square.
    hidden = ~valid & (torch.arange(W) >= 2)
    assert hidden[3:7].any() and not hidden[:3].any() and not hidden[7:].any()
    if bg_disp == 2.0:
        cols = hidden[3:7].nonzero()[:, 1].unique().tolist()
        assert cols == [8, 9]  # x - 2 in {6,...,9} and not the square itself in view i (10..13)


def test_inverse_depth_sampling_is_exact_on_a_slanted_plane():
    """1/z is affine in (u, v) on a plane, so an inverse-depth lookup matches to rounding error;
    linear depth interpolation would miss by far more than the 1e-9 tolerance."""
    H, W = 12, 14
    K_i = make_K(12.0, 12.0, 6.5, 5.5)
    K_j = make_K(11.0, 11.5, 7.0, 5.0)
    c2w_i = torch.eye(4, dtype=torch.float64)
    c2w_j = pose(rodrigues([0.1, 1.0, 0.0], 8.0), (0.6, 0.1, 0.05))
    n_w, c_w = torch.tensor([0.3, -0.2, 1.0], dtype=torch.float64), 4.0  # plane n . X = c

    def plane_depth(K, c2w):
        R, t = c2w[:3, :3], c2w[:3, 3]
        n_cam, c_cam = R.T @ n_w, c_w - n_w @ t
        ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
        rays = torch.stack([(xs - K[0, 2]) / K[0, 0], (ys - K[1, 2]) / K[1, 1], torch.ones(H, W)], -1)
        return c_cam / (rays.double() @ n_cam)  # z-depth of the plane along each pixel ray

    depth_i, depth_j = plane_depth(K_i, c2w_i), plane_depth(K_j, c2w_j)
    assert depth_j.min() > 0 and (depth_j.max() / depth_j.min()) > 1.2  # really slanted
    uv, in_view = G.reproject(depth_i, K_i, c2w_i, K_j, c2w_j)
    _, visible = G.reproject(depth_i, K_i, c2w_i, K_j, c2w_j, depth_j=depth_j, rel_tol=1e-9)
    # Exactness holds where four neighbours exist; the outer half-pixel band is clamped to the
    # border pixel (nearest-neighbour), which is only as good as the tolerance allows.
    interior = in_view & (uv[..., 0] >= 0) & (uv[..., 0] <= W - 1) & (uv[..., 1] >= 0) & (uv[..., 1] <= H - 1)
    assert interior.float().mean() > 0.5
    assert torch.equal(visible & interior, interior)
    _, loose = G.reproject(depth_i, K_i, c2w_i, K_j, c2w_j, depth_j=depth_j, rel_tol=0.02)
    assert torch.equal(loose, in_view)


def test_behind_camera_and_out_of_image():
    H, W, f, Z = 8, 10, 6.0, 2.0
    K = make_K(f, f, 4.3, 3.2)  # no pixel lands exactly on a bound
    depth = torch.full((H, W), Z, dtype=torch.float64)
    eye = torch.eye(4, dtype=torch.float64)
    # Camera j beyond the plane, looking the same way: every point is behind it.
    _, valid = G.reproject(depth, K, eye, K, pose(t=(0, 0, 3.0)))
    assert not valid.any()
    # Camera j turned around: also behind (z_j = -2 < 0), though the homogeneous projection
    # would land inside the image.
    _, valid = G.reproject(depth, K, eye, K, pose(rodrigues([0, 1, 0], 180.0)))
    assert not valid.any()
    # Camera j halfway to the plane: the plane is magnified 2x, only the middle stays in view.
    _, valid = G.reproject(depth, K, eye, K, pose(t=(0, 0, 1.0)))
    xs = torch.arange(W, dtype=torch.float64)
    ys = torch.arange(H, dtype=torch.float64)
    u_j = 2 * (xs - 4.3) + 4.3
    v_j = 2 * (ys - 3.2) + 3.2
    expected = ((v_j >= -0.5) & (v_j < H - 0.5))[:, None] & ((u_j >= -0.5) & (u_j < W - 0.5))[None, :]
    assert 0 < expected.sum() < H * W
    assert torch.equal(valid, expected)
    # An explicit image size for view j changes the bounds.
    _, valid = G.reproject(depth, K, eye, K, pose(t=(0, 0, 1.0)), image_size_j=(2 * H, 2 * W))
    u_ok = (u_j >= -0.5) & (u_j < 2 * W - 0.5)
    v_ok = (v_j >= -0.5) & (v_j < 2 * H - 0.5)
    assert torch.equal(valid, v_ok[:, None] & u_ok[None, :])


def test_invalid_source_depth_is_invalid_and_finite():
    H, W = 4, 5
    K = make_K(5.0, 5.0, 2.0, 1.5)
    depth = torch.full((H, W), 3.0, dtype=torch.float64)
    bad = [(0, 0, 0.0), (1, 1, float("nan")), (2, 2, float("inf")), (3, 3, -1.0), (0, 4, float("-inf"))]
    for y, x, value in bad:
        depth[y, x] = value
    depth_j = torch.full((H, W), 3.0, dtype=torch.float64)
    depth_j[1, 0] = float("nan")  # a hole in the target depth invalidates what lands on it
    uv, valid = G.reproject(depth, K, torch.eye(4, dtype=torch.float64), K, torch.eye(4, dtype=torch.float64),
                            depth_j=depth_j)
    expected = torch.ones(H, W, dtype=torch.bool)
    for y, x, _ in bad:
        expected[y, x] = False
    expected[1, 0] = False
    assert torch.equal(valid, expected)
    assert torch.isfinite(uv).all()


def test_reproject_accepts_numpy():
    K = make_K(5.0, 5.0, 2.0, 1.5).numpy()
    depth = np.full((4, 5), 2.0)
    uv, valid = G.reproject(depth, K, np.eye(4), K, np.eye(4))
    assert isinstance(uv, torch.Tensor) and valid.all()
    assert uv.dtype == torch.float64


# ------------------------------------------------------------------------------------------------
# unproject / project / poses


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unproject_matches_pinhole_and_round_trips(dtype):
    gen = torch.Generator().manual_seed(1)
    B, H, W = 2, 5, 7
    K = torch.stack([make_K(9.0, 8.0, 3.2, 2.1), make_K(7.0, 7.5, 2.9, 2.4)]).to(dtype)
    c2w = torch.stack([random_pose(gen), random_pose(gen)]).to(dtype)
    depth = (torch.rand(B, H, W, generator=gen, dtype=torch.float64) * 4 + 1).to(dtype)
    points = G.unproject(depth, K, c2w)
    assert points.shape == (B, H, W, 3) and points.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for b, y, x in [(0, 0, 0), (1, 4, 6), (0, 2, 5)]:
        expected = pixel_point_world(
            float(x), float(y), depth[b, y, x].double(), K[b].double(), c2w[b].double()
        )
        torch.testing.assert_close(points[b, y, x].double(), expected, atol=tol * 10, rtol=0)
    uv, z = G.project(points, K, c2w)
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    grid = torch.stack([xs, ys], -1).to(dtype).expand(B, H, W, 2)
    torch.testing.assert_close(uv, grid, atol=tol * 10, rtol=0)
    torch.testing.assert_close(z, depth, atol=tol * 10, rtol=0)
    torch.testing.assert_close(G.pixel_grid(H, W, dtype)[..., 0], xs.to(dtype))


def test_relative_pose_maps_camera_i_to_camera_j():
    gen = torch.Generator().manual_seed(2)
    c2w_i, c2w_j = random_pose(gen), random_pose(gen)
    p_i = torch.tensor([0.3, -1.2, 2.5, 1.0], dtype=torch.float64)
    expected = torch.linalg.inv(c2w_j) @ (c2w_i @ p_i)  # via the world, with a general inverse
    torch.testing.assert_close(G.relative_pose(c2w_i, c2w_j) @ p_i, expected)
    torch.testing.assert_close(G.invert_rigid(c2w_i), torch.linalg.inv(c2w_i))


# ------------------------------------------------------------------------------------------------
# look_at / orbit: the "upside-down camera" pitfall


@pytest.mark.parametrize("azimuth", [0.0, 37.0, 90.0, 200.0, 315.0])
@pytest.mark.parametrize("elevation", [-20.0, 10.0, 45.0])
def test_world_up_projects_above_image_centre(azimuth, elevation):
    K = make_K(50.0, 50.0, 31.5, 23.5)
    centre = torch.tensor([0.2, -0.1, 0.5], dtype=torch.float64)
    c2w = G.orbit_cam2world(azimuth, elevation, 3.0, target=centre, dtype=torch.float64)
    a, e = math.radians(azimuth), math.radians(elevation)
    direction = [math.cos(e) * math.cos(a), math.cos(e) * math.sin(a), math.sin(e)]
    expected_eye = centre + 3.0 * torch.tensor(direction, dtype=torch.float64)
    torch.testing.assert_close(c2w[:3, 3], expected_eye)
    R = c2w[:3, :3]
    torch.testing.assert_close(R.T @ R, torch.eye(3, dtype=torch.float64))
    assert torch.det(R) > 0  # a rotation, not a reflection
    uv_c, _ = G.project(centre, K, c2w)
    torch.testing.assert_close(uv_c, K[:2, 2])  # the target is on the optical axis
    uv_up, z_up = G.project(centre + torch.tensor([0, 0, 0.4], dtype=torch.float64), K, c2w)
    assert z_up > 0 and uv_up[1] < K[1, 2] - 1  # world up is image up
    assert abs(float(uv_up[0] - K[0, 2])) < 1e-9  # and straight above: no roll
    # Handedness: z up, looking from +x towards -x (facing "west"), world +y ("north") is on the
    # image right.
    if azimuth == 0.0:
        uv_y, _ = G.project(centre + torch.tensor([0, 0.4, 0], dtype=torch.float64), K, c2w)
        assert uv_y[0] > K[0, 2] + 1


def test_look_at_custom_up_and_degenerate():
    K = make_K(40.0, 40.0, 20.0, 15.0)
    # A y-down (OpenCV-like) world: up is -y.
    c2w = G.look_at([0.0, -1.0, -4.0], [0.0, 0.0, 0.0], up=[0.0, -1.0, 0.0])
    uv, _ = G.project(torch.tensor([0.0, -0.5, 0.0]), K, c2w)
    assert uv[1] < K[1, 2] - 1
    with pytest.raises(ValueError, match="parallel"):
        G.look_at([0.0, 0.0, 3.0], [0.0, 0.0, 0.0])


def test_rotation_angle_deg():
    gen = torch.Generator().manual_seed(4)
    base = random_pose(gen)
    for angle in [1e-4, 7.0, 45.0, 90.0, 179.9]:
        other = base.clone()
        other[:3, :3] = base[:3, :3] @ rodrigues([0.2, -0.7, 0.4], angle)
        other[:3, 3] += 1.0  # translation must not matter
        got = float(G.rotation_angle_deg(base, other))
        assert abs(got - angle) < 1e-7 * max(1.0, angle), (angle, got)
    assert float(G.rotation_angle_deg(base, base)) == 0.0


def test_intrinsics_resize_and_crop_follow_pixel_footprints():
    K = make_K(20.0, 22.0, 7.5, 5.5)
    # 2x2 average pooling: new pixel (0, 0) covers old pixels 0..1, whose joint centre is (0.5, 0.5).
    K_half = G.scale_intrinsics(K, 0.5)
    torch.testing.assert_close(K_half, make_K(10.0, 11.0, 3.5, 2.5))
    point = torch.tensor([0.7, -0.3, 3.0], dtype=torch.float64)
    eye = torch.eye(4, dtype=torch.float64)
    uv_old, _ = G.project(point, K, eye)
    uv_new, _ = G.project(point, K_half, eye)
    torch.testing.assert_close(uv_new, (uv_old - 0.5) / 2)  # old (0.5, 0.5) -> new (0, 0)
    # Non-uniform upscale: new pixels 0..2 subdivide old pixel 0 (x3), so old u = 0 -> new u = 1.
    K_up = G.scale_intrinsics(K, 3.0, 2.0)
    uv_up, _ = G.project(point, K_up, eye)
    torch.testing.assert_close(uv_up, torch.stack([uv_old[0] * 3 + 1, uv_old[1] * 2 + 0.5]))
    # Crop starting at pixel (3, 2): that pixel becomes (0, 0).
    uv_crop, _ = G.project(point, G.crop_intrinsics(K, 3, 2), eye)
    torch.testing.assert_close(uv_crop, uv_old - torch.tensor([3.0, 2.0], dtype=torch.float64))
    assert K[0, 2] == 7.5  # inputs are not modified
