"""The embedded synthetic scenes against independent references: analytic ray casts, hand-written
projection and reprojection in float64, and photo-consistency across views."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cameo_bench.data.batch import collate, validate_batch
from cameo_bench.data.synthetic import SceneConfig, SyntheticScenes

H = W = 64


@pytest.fixture(scope="module")
def orbit_batch():
    """The acceptance set: 20 random scenes, 4 views 30 degrees apart, 64x64."""
    ds = SyntheticScenes(20, 4, H, azimuth_step_deg=30.0, seed=123)
    return ds.render_scenes(range(20))


# ---------------------------------------------------------------------------------------------
# Independent references (float64, written from the conventions, not from the renderer)
# ---------------------------------------------------------------------------------------------


def _pixel_rays(K: torch.Tensor, h: int, w: int) -> torch.Tensor:  # [h, w, 3] camera frame, z = 1
    v, u = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    K = K.double()
    return torch.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], torch.ones_like(u)], dim=-1)


def _world_to_pixel(X: torch.Tensor, K: torch.Tensor, c2w: torch.Tensor):
    """[..., 3] world -> (u, v, z) in a camera, by the OpenCV pinhole model."""
    K, c2w = K.double(), c2w.double()
    Xc = (X.double() - c2w[:3, 3]) @ c2w[:3, :3]  # R^T (X - t), row-vector form
    z = Xc[..., 2]
    return K[0, 0] * Xc[..., 0] / z + K[0, 2], K[1, 1] * Xc[..., 1] / z + K[1, 2], z


def _bilinear(img: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """img [C, h, w] sampled at float pixel coords (pixel centres at integers) -> [C, ...]."""
    h, w = img.shape[-2:]
    u, v = u.clamp(0, w - 1), v.clamp(0, h - 1)
    x0, y0 = u.floor().long().clamp(max=w - 2), v.floor().long().clamp(max=h - 2)
    fx, fy = u - x0, v - y0
    img = img.double()
    return (
        img[:, y0, x0] * (1 - fx) * (1 - fy)
        + img[:, y0, x0 + 1] * fx * (1 - fy)
        + img[:, y0 + 1, x0] * (1 - fx) * fy
        + img[:, y0 + 1, x0 + 1] * fx * fy
    )


def _local_warp_error(item_i, item_j, rel_tol=0.02):
    """Per-pixel colour error of view j warped into view i, with a nearest-pixel depth test and all
    four bilinear neighbours required to see the same surface. -> errors on the kept pixels."""
    depth_i, depth_j = item_i["depth"].double(), item_j["depth"].double()
    rays = _pixel_rays(item_i["K"], H, W)
    Xc = rays * depth_i[..., None]
    R, t = item_i["c2w"][:3, :3].double(), item_i["c2w"][:3, 3].double()
    X = Xc @ R.T + t
    u, v, z = _world_to_pixel(X, item_j["K"], item_j["c2w"])
    ok = (depth_i > 0) & (z > 0) & (u >= 0) & (u <= W - 1) & (v >= 0) & (v <= H - 1)
    u, v = torch.where(ok, u, 0), torch.where(ok, v, 0)
    x0, y0 = u.floor().long().clamp(max=W - 2), v.floor().long().clamp(max=H - 2)
    # Every bilinear neighbour must see the same surface: its depth is within the depth change
    # across one pixel (small on smooth surfaces) of z, while an occluder differs by much more.
    for dy in (0, 1):
        for dx in (0, 1):
            d = depth_j[y0 + dy, x0 + dx]
            ok &= (d > 0) & ((z - d).abs() <= rel_tol * d)
    warped = _bilinear(item_j["image"], u, v)  # [3, H, W]
    err = (warped - item_i["image"].double()).abs().mean(0)
    return err[ok], ok


# ---------------------------------------------------------------------------------------------
# Acceptance: correspondence ground truth is photo-consistent
# ---------------------------------------------------------------------------------------------


def _warp_errors(batch, depth):
    from cameo_bench.geometry import reproject

    errors, valid_fraction = [], []
    V = batch["image"].shape[1]
    for i in range(V):
        for j in range(V):
            if i == j:
                continue
            uv, valid = reproject(
                depth[:, i], batch["intrinsics"][:, i], batch["cam2world"][:, i],
                batch["intrinsics"][:, j], batch["cam2world"][:, j], depth_j=depth[:, j],
            )  # [B, H, W, 2], [B, H, W]
            grid = torch.stack([uv[..., 0] / (W - 1) * 2 - 1, uv[..., 1] / (H - 1) * 2 - 1], dim=-1)
            sampled = F.grid_sample(batch["image"][:, j], grid, mode="bilinear", align_corners=True)
            err = (sampled - batch["image"][:, i]).abs().mean(1)  # [B, H, W]
            errors.append(err[valid])
            valid_fraction.append(valid.float().mean())
    return torch.cat(errors), torch.stack(valid_fraction).mean()


def test_reprojection_warp_is_photo_consistent(orbit_batch):
    """THE acceptance test: warping view j into view i with geometry.reproject and the rendered
    depths reproduces view i (mean |dRGB| < 0.02 on valid pixels, 20 scenes, 64x64)."""
    errors, valid_fraction = _warp_errors(orbit_batch, orbit_batch["depth"])
    assert valid_fraction > 0.3, "too few valid correspondences for the test to mean anything"
    assert errors.mean() < 0.02, f"mean colour error {errors.mean():.4f}"
    assert errors.median() < 0.01


def test_warp_with_ray_distance_instead_of_z_depth_fails(orbit_batch):
    """Control: the photo-consistency check is sharp enough to catch ray distance stored as depth."""
    K = orbit_batch["intrinsics"][0, 0]
    ray_length = _pixel_rays(K, H, W).norm(dim=-1).float()  # [H, W]
    errors, _ = _warp_errors(orbit_batch, orbit_batch["depth"] * ray_length)
    assert errors.mean() > 0.02


def test_independent_reprojection_is_photo_consistent(orbit_batch):
    """The same acceptance check with a hand-written float64 reprojection (no geometry module).
    Its occlusion test is stricter (all four bilinear neighbours must see the same surface), which
    drops silhouette pixels, so the bound is tighter too (measured mean 0.006)."""
    errors, kept = [], 0
    for b in range(orbit_batch["image"].shape[0]):
        items = [
            {"image": orbit_batch["image"][b, v], "depth": orbit_batch["depth"][b, v],
             "K": orbit_batch["intrinsics"][b, v], "c2w": orbit_batch["cam2world"][b, v]}
            for v in range(4)
        ]
        for i, j in ((0, 1), (1, 0), (0, 2), (3, 1)):
            err, ok = _local_warp_error(items[i], items[j])
            errors.append(err)
            kept += int(ok.sum())
    errors = torch.cat(errors)
    assert kept > 0.2 * 20 * 4 * H * W
    assert errors.mean() < 0.01, f"mean colour error {errors.mean():.4f}"


def test_point_map_is_the_world_point_of_each_pixel(orbit_batch):
    """point_map = c2w applied to depth * K^-1 [u, v, 1] (float64 reference), 0 where depth is 0."""
    for b in range(2):
        for v in (0, 3):
            depth = orbit_batch["depth"][b, v].double()
            Xc = _pixel_rays(orbit_batch["intrinsics"][b, v], H, W) * depth[..., None]
            c2w = orbit_batch["cam2world"][b, v].double()
            X = Xc @ c2w[:3, :3].T + c2w[:3, 3]  # [H, W, 3]
            got = orbit_batch["point_map"][b, v].permute(1, 2, 0).double()
            torch.testing.assert_close(got, X, atol=2e-4 * depth.max().item(), rtol=0)


# ---------------------------------------------------------------------------------------------
# Depth is z-depth: analytic floor and sphere
# ---------------------------------------------------------------------------------------------


def test_floor_depth_is_analytic_z_depth():
    """Only a floor disk: the depth of each pixel is the z-depth of the ray/plane hit, not its
    distance along the ray, and pixels off the disk are 0."""
    ds = SyntheticScenes(3, 2, (40, 56), azimuth_step_deg=50.0, seed=7, room=False, num_objects=(0, 0))
    cfg = ds.config
    for index in range(3):
        item = ds[index]
        for v in range(2):
            K, c2w = item["intrinsics"][v], item["cam2world"][v].double()
            rays = _pixel_rays(K, 40, 56)  # camera frame, z = 1
            d = rays @ c2w[:3, :3].T  # world
            o = c2w[:3, 3]
            t = -o[2] / d[..., 2]  # z = 0 plane; t is the z-depth because the camera-z of rays is 1
            hit_xy = o[:2] + t[..., None] * d[..., :2]
            on_disk = (t > 0) & (hit_xy.norm(dim=-1) < cfg.floor_radius)
            depth = item["depth"][v].double()
            margin = (hit_xy.norm(dim=-1) - cfg.floor_radius).abs() > 1e-3
            assert torch.equal(depth[margin] > 0, on_disk[margin])
            torch.testing.assert_close(depth[on_disk], t[on_disk], rtol=1e-4, atol=0)
            ray_distance = t * rays.norm(dim=-1)
            assert (ray_distance[on_disk] - t[on_disk]).abs().max() > 0.05  # the two really differ


def test_sphere_depth_is_analytic_z_depth():
    """One sphere over the floor disk: where the analytic ray (unit direction) meets the sphere
    first, depth = ray distance * cos(angle to the optical axis)."""
    ds = SyntheticScenes(
        4, 2, 48, azimuth_step_deg=40.0, seed=11, room=False, num_objects=(1, 1), box_prob=0.0
    )
    checked = 0
    for index in range(4):
        scene, item = ds.scene(index), ds[index]
        centre, radius = scene.centre[0].double(), float(scene.size[0, 0])
        for v in range(2):
            c2w = item["cam2world"][v].double()
            rays = _pixel_rays(item["intrinsics"][v], 48, 48)
            unit = rays / rays.norm(dim=-1, keepdim=True)
            d = unit @ c2w[:3, :3].T
            oc = c2w[:3, 3] - centre
            b = (d * oc).sum(-1)
            disc = b * b - (oc @ oc - radius**2)
            dist = -b - disc.clamp(min=0).sqrt()
            on_sphere = disc > 1e-3  # away from the silhouette, where float32 may round either way
            z = dist * unit[..., 2]  # z-depth = distance * cos
            depth = item["depth"][v].double()
            torch.testing.assert_close(depth[on_sphere], z[on_sphere], rtol=1e-4, atol=0)
            checked += int(on_sphere.sum())
    assert checked > 200


# ---------------------------------------------------------------------------------------------
# Cameras
# ---------------------------------------------------------------------------------------------


def test_point_above_scene_centre_projects_above_image_centre():
    """z is up in the world; the image v axis points down. Catches upside-down cameras, which are
    self-consistent and would pass every reprojection test."""
    ds = SyntheticScenes(5, 4, (48, 64), azimuth_step_deg=70.0, seed=3)
    centre = torch.tensor([0.0, 0.0, ds.config.target_height], dtype=torch.float64)
    for index in range(5):
        item = ds[index]
        for v in range(4):
            K, c2w = item["intrinsics"][v], item["cam2world"][v]
            u0, v0, z0 = _world_to_pixel(centre, K, c2w)
            assert z0 > 0 and abs(u0 - K[0, 2]) < 1e-3 and abs(v0 - K[1, 2]) < 1e-3  # looks at the centre
            u1, v1, _ = _world_to_pixel(centre + torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), K, c2w)
            assert v1 < K[1, 2] - 5 and abs(u1 - K[0, 2]) < 1e-3


def test_rendered_room_has_floor_below_and_ceiling_above():
    """Image content agrees with the cameras: the bottom row sees the floor (world z = 0), the top
    row sees something high (wall or ceiling)."""
    item = SyntheticScenes(1, 2, 32, azimuth_step_deg=30.0, seed=5, num_objects=(0, 0))[0]
    z_world = item["point_map"][:, 2]  # [V, H, W]
    assert torch.allclose(z_world[:, -1], torch.zeros_like(z_world[:, -1]), atol=1e-4)
    assert (z_world[:, 0] > 1.0).all()


@pytest.mark.parametrize("step", [15.0, 45.0, 120.0])
def test_azimuth_step_is_respected(step):
    ds = SyntheticScenes(4, 4, 16, azimuth_step_deg=step, seed=1)
    for index in range(4):
        c2w = ds[index]["cam2world"].double()
        eye = c2w[:, :3, 3]
        azimuth = torch.rad2deg(torch.atan2(eye[:, 1], eye[:, 0]))
        delta = torch.remainder(azimuth[1:] - azimuth[:-1], 360.0)
        torch.testing.assert_close(delta, torch.full_like(delta, step), atol=1e-3, rtol=0)
        # the yaw of the optical axis turns by the same amount
        forward = c2w[:, :3, 2]
        yaw = torch.rad2deg(torch.atan2(forward[:, 1], forward[:, 0]))
        torch.testing.assert_close(torch.remainder(yaw[1:] - yaw[:-1], 360.0), delta, atol=1e-3, rtol=0)


def test_cameras_are_rigid_and_intrinsics_plausible():
    ds = SyntheticScenes(3, 3, (24, 40), azimuth_step_deg=None, seed=2, camera_mode="random")
    for index in range(3):
        item = ds[index]
        R = item["cam2world"][:, :3, :3].double()
        torch.testing.assert_close(R.transpose(-1, -2) @ R, torch.eye(3, dtype=torch.float64).expand(3, 3, 3))
        assert torch.allclose(torch.linalg.det(R), torch.ones(3, dtype=torch.float64))
        assert torch.equal(item["cam2world"][:, 3], torch.tensor([0.0, 0, 0, 1]).expand(3, 4))
        K = item["intrinsics"]
        fov = 2 * torch.rad2deg(torch.atan(20 / K[:, 0, 0]))
        assert ((fov > 49.9) & (fov < 60.1)).all()
        assert torch.allclose(K[:, 0, 2], torch.tensor(19.5)) and torch.allclose(K[:, 1, 2], torch.tensor(11.5))


# ---------------------------------------------------------------------------------------------
# Format and determinism
# ---------------------------------------------------------------------------------------------


def test_items_follow_the_batch_format():
    ds = SyntheticScenes(2, 3, (24, 40), azimuth_step_deg=20.0, seed=0, num_ref=2)
    item = ds[1]
    validate_batch(item, batched=False)
    assert item["image"].shape == (3, 3, 24, 40) and item["image"].dtype == torch.float32
    assert item["depth"].shape == (3, 24, 40) and item["point_map"].shape == (3, 3, 24, 40)
    assert item["intrinsics"].shape == (3, 3, 3) and item["cam2world"].shape == (3, 4, 4)
    assert item["num_ref"] == 2 and isinstance(item["num_ref"], int)
    assert item["image"].min() >= 0 and item["image"].max() <= 1
    assert (item["depth"] > 0).all(), "with a room every ray hits a surface"
    assert item["image"].std() > 0.05, "images must have texture"

    no_room = SyntheticScenes(2, 3, 24, azimuth_step_deg=20.0, seed=0, room=False)[0]
    miss = no_room["depth"] == 0
    assert miss.any() and (~miss).any()
    assert (no_room["point_map"].permute(1, 0, 2, 3)[:, miss] == 0).all()
    assert (no_room["image"].permute(1, 0, 2, 3)[:, miss] == 0).all()


def test_items_are_deterministic_and_independent_of_batching():
    ds = SyntheticScenes(8, 3, 32, azimuth_step_deg=25.0, seed=42)
    first = ds[5]
    again = SyntheticScenes(8, 3, 32, azimuth_step_deg=25.0, seed=42)[5]
    in_batch = ds.render_scenes([2, 5, 7])
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate)
    via_loader = next(iter(loader))  # scenes 0, 1, 2 through __getitems__
    for key in ("image", "depth", "point_map", "intrinsics", "cam2world"):
        assert torch.equal(first[key], again[key]), key
        assert torch.equal(first[key], in_batch[key][1]), key
        assert torch.equal(via_loader[key][2], ds[2][key]), key
    other = ds[4]
    assert not torch.allclose(first["image"], other["image"], atol=0.05)
    other_seed = SyntheticScenes(8, 3, 32, azimuth_step_deg=25.0, seed=43)[5]
    assert not torch.allclose(first["image"], other_seed["image"], atol=0.05)


def test_scene_content_does_not_depend_on_view_count_or_camera_mode():
    a = SyntheticScenes(4, 2, 16, azimuth_step_deg=10.0, seed=9).scene(3)
    b = SyntheticScenes(4, 5, 16, azimuth_step_deg=None, seed=9, camera_mode="random").scene(3)
    for field in ("centre", "size", "tex_colors", "lattice"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_textures_are_mostly_non_repetitive():
    ds = SyntheticScenes(50, 2, 8, azimuth_step_deg=10.0, seed=0)
    kinds = torch.cat([ds.scene(i).tex_kind for i in range(50)])
    repetitive = (kinds <= 1).float().mean()
    assert 0.05 < repetitive < 0.4
    assert set(kinds.tolist()) == {0, 1, 2, 3, 4}


def test_bad_arguments_raise():
    with pytest.raises(TypeError, match="num_objectz"):
        SyntheticScenes(2, 3, 16, 10.0, 0, num_objectz=(1, 2))
    with pytest.raises(ValueError, match="num_ref"):
        SyntheticScenes(2, 3, 16, 10.0, 0, num_ref=3)
    with pytest.raises(ValueError, match="azimuth_step_deg"):
        SyntheticScenes(2, 3, 16, None, 0)
    with pytest.raises(ValueError, match="camera_mode"):
        SyntheticScenes(2, 3, 16, 10.0, 0, camera_mode="spiral")
    with pytest.raises(IndexError):
        SyntheticScenes(2, 3, 16, 10.0, 0)[2]
    with pytest.raises(ValueError, match="inside objects"):
        SceneConfig(placement_radius=3.5)


def test_references_at_the_ends_of_the_arc_reorder_the_same_cameras():
    """`reference_placement='ends'`: the cameras are those of the plain orbit, views reordered to
    (first, last, the ones between), so the two references bracket every target in azimuth."""
    plain = SyntheticScenes(2, 4, 16, 20.0, 3, num_ref=1)
    ends = SyntheticScenes(2, 4, 16, 20.0, 3, num_ref=2, reference_placement="ends")
    for i in range(2):
        a, b = plain.scene(i).cam2world, ends.scene(i).cam2world
        assert torch.equal(b, a[[0, 3, 1, 2]])
    item = ends[0]
    assert item["num_ref"] == 2
    centre = lambda v: item["cam2world"][v, :2, 3]  # noqa: E731 (x, y) of the camera centre
    azimuth = [math.degrees(math.atan2(float(centre(v)[1]), float(centre(v)[0]))) for v in range(4)]
    steps = [((azimuth[v] - azimuth[0]) % 360) for v in (2, 3, 1)]
    assert steps == pytest.approx([20.0, 40.0, 60.0], abs=1e-3)
    with pytest.raises(ValueError, match="num_ref=2"):
        SyntheticScenes(2, 4, 16, 20.0, 3, num_ref=1, reference_placement="ends")
    with pytest.raises(ValueError, match="reference_placement"):
        SyntheticScenes(2, 4, 16, 20.0, 3, num_ref=2, reference_placement="middle")


def test_the_spec_offers_the_reference_placements_the_scenes_accept():
    from cameo_bench.config import spec
    from cameo_bench.data import synthetic

    assert spec.REFERENCE_PLACEMENTS == synthetic.REFERENCE_PLACEMENTS
