"""Scene folders: write/read round trips, validation errors that name the file, and the dataset's
view sampling, resizing and round trip from the synthetic scenes.

Expected values come from hand-built look-at cameras, analytic orbit angles and images that encode
their own frame index or pixel coordinates, never from the code under test.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from cameo_bench.__main__ import main
from cameo_bench.data.scene_dataset import SceneFolderDataset
from cameo_bench.data.scene_format import DatasetWriter, SceneFolderError, read_scene, write_scene


def look_at(eye, target, up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """OpenCV camera-to-world: z towards the target, x right, y down (world z is up)."""
    eye, target, up = (np.asarray(v, dtype=np.float64) for v in (eye, target, up))
    z = (target - eye) / np.linalg.norm(target - eye)
    x = np.cross(z, up)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    c2w = np.eye(4)
    c2w[:3, :3] = np.stack([x, y, z], axis=1)
    c2w[:3, 3] = eye
    return c2w


def orbit(num_frames: int, step_deg: float, radius: float = 4.0, elevation_deg: float = 20.0) -> np.ndarray:
    el = np.radians(elevation_deg)
    cams = []
    for i in range(num_frames):
        az = np.radians(step_deg * i)
        eye = radius * np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)])
        cams.append(look_at(eye, (0, 0, 0)))
    return np.stack(cams)


def project(K, c2w, X) -> np.ndarray:
    Xc = np.linalg.inv(c2w) @ np.append(X, 1.0)
    uvw = K @ Xc[:3]
    return uvw[:2] / uvw[2]


def simple_K(h, w, f=20.0):
    return np.array([[f, 0, (w - 1) / 2], [0, f * 1.1, (h - 1) / 2 + 0.7], [0, 0, 1]])


def index_images(num_frames, h=8, w=8) -> np.ndarray:
    """Frame i is filled with grey level 10 i, so a loaded item tells which frames it holds."""
    return np.stack([np.full((h, w, 3), 10 * i, np.uint8) for i in range(num_frames)])


def decode_frames(item) -> list[int]:
    return [int(round(v)) for v in (item["image"][:, 0].mean(dim=(-1, -2)) * 255 / 10).tolist()]


def make_dataset(root, scenes: dict[str, dict], split="train"):
    with DatasetWriter(root) as writer:
        for scene_id, kwargs in scenes.items():
            writer.add(scene_id, split, **kwargs)
    return root


# ------------------------------------------------------------------------------------------------
# Writing and reading


def test_write_read_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    F, H, W = 3, 6, 10
    images = rng.integers(0, 256, (F, H, W, 3), dtype=np.uint8)
    K = np.stack([simple_K(H, W, 9.0 + i) for i in range(F)])
    c2w = orbit(F, 25.0)
    depth = rng.uniform(0.5, 30.0, (F, H, W)).astype(np.float32)
    depth[0, 0, 0] = 0.0
    masks = rng.integers(0, 256, (F, H, W), dtype=np.uint8)
    xyz = rng.normal(size=(F, 4, 5, 3)).astype(np.float32)
    conf = rng.uniform(size=(F, 4, 5)).astype(np.float32)
    write_scene(tmp_path / "s", images, K, c2w, depth=depth, masks=masks,
                point_maps={"vggt": (xyz, conf)}, meta={"source": "test"})
    scene = read_scene(tmp_path / "s")
    np.testing.assert_array_equal(np.stack(scene.images), images)
    np.testing.assert_array_equal(np.stack(scene.masks), masks)
    np.testing.assert_allclose(scene.K, K, atol=1e-12)
    np.testing.assert_allclose(scene.c2w, c2w, atol=1e-12)
    np.testing.assert_allclose(np.stack(scene.depth), depth, rtol=1e-3)  # float16 storage
    assert scene.depth[0][0, 0] == 0
    np.testing.assert_allclose(np.stack(scene.point_maps["vggt"][0]), xyz, atol=2e-3)
    np.testing.assert_allclose(np.stack(scene.point_maps["vggt"][1]), conf, atol=1e-3)
    assert scene.meta == {"source": "test"}
    cams = json.loads((tmp_path / "s" / "cameras.json").read_text())
    assert (cams["convention"], cams["pose"], cams["depth"]) == ("opencv", "c2w", "z")
    assert (cams["frames"][0]["w"], cams["frames"][0]["h"]) == (W, H)


def test_float_images_in_batch_layout_are_quantised_once(tmp_path):
    images = torch.rand(2, 3, 5, 7)  # [F, 3, H, W] in [0, 1]
    write_scene(tmp_path / "s", images, np.stack([simple_K(5, 7)] * 2), orbit(2, 10.0))
    loaded = np.stack(read_scene(tmp_path / "s").images).astype(np.float64) / 255  # [F, H, W, 3]
    assert np.abs(loaded - images.permute(0, 2, 3, 1).numpy()).max() <= 0.5 / 255 + 1e-6


def test_writer_rejects_bad_input_and_leaves_nothing(tmp_path):
    K, c2w, images = np.stack([simple_K(8, 8)] * 3), orbit(3, 10.0), index_images(3)
    with pytest.raises(SceneFolderError, match="depth has 2 frames but images has 3"):
        write_scene(tmp_path / "a", images, K, c2w, depth=np.ones((2, 8, 8)))
    bad = c2w.copy()
    bad[1, :3, :3] *= 1.5
    with pytest.raises(SceneFolderError, match=r"c2w\[1\].*not a rigid"):
        write_scene(tmp_path / "b", images, K, bad)
    bad_K = K.copy()
    bad_K[2, 0, 2] = np.nan
    with pytest.raises(SceneFolderError, match=r"K\[2\].*not finite"):
        write_scene(tmp_path / "c", images, bad_K, c2w)
    assert list(tmp_path.iterdir()) == []  # no scene folder, no temporary leftovers
    write_scene(tmp_path / "d", images, K, c2w)
    with pytest.raises(SceneFolderError, match="already exists"):
        write_scene(tmp_path / "d", images, K, c2w)


def _write_small(tmp_path, **kwargs):
    folder = tmp_path / "s"
    write_scene(folder, index_images(3), np.stack([simple_K(8, 8)] * 3), orbit(3, 10.0),
                depth=np.ones((3, 8, 8)), **kwargs)
    return folder


def test_truncated_png_error_names_the_file(tmp_path):
    folder = _write_small(tmp_path)
    png = folder / "images" / "000001.png"
    png.write_bytes(png.read_bytes()[:40])
    with pytest.raises(SceneFolderError, match=re.escape(str(png))):
        read_scene(folder)


def test_bad_npy_error_names_the_file(tmp_path):
    folder = _write_small(tmp_path)
    npy = folder / "depth" / "000002.npy"
    npy.write_bytes(b"not a numpy file")
    with pytest.raises(SceneFolderError, match=re.escape(str(npy))):
        read_scene(folder)
    np.save(npy, np.ones((4, 4), np.float16))  # wrong shape
    with pytest.raises(SceneFolderError, match=re.escape(str(npy)) + r".*\(8, 8\)"):
        read_scene(folder)


def test_missing_image_and_bad_camera_errors_name_file_and_field(tmp_path):
    folder = _write_small(tmp_path)
    (folder / "images" / "000000.png").unlink()
    with pytest.raises(SceneFolderError, match=r"frames\[0\]\.image.*000000\.png does not exist"):
        read_scene(folder)
    folder = _write_small(tmp_path / "b")
    cams = json.loads((folder / "cameras.json").read_text())
    cams["frames"][2]["c2w"][0][0] = 3.0
    (folder / "cameras.json").write_text(json.dumps(cams))
    with pytest.raises(SceneFolderError, match=r"cameras\.json: frames\[2\]\.c2w.*not a rigid"):
        read_scene(folder)
    cams["frames"][2]["c2w"][0][0] = float("inf")
    (folder / "cameras.json").write_text(json.dumps(cams))
    with pytest.raises(SceneFolderError, match=r"frames\[2\]\.c2w.*not finite"):
        read_scene(folder)


def test_corrupt_image_fails_in_the_dataset_naming_the_file(tmp_path):
    root = make_dataset(tmp_path / "ds", {"a": dict(images=index_images(3), K=np.stack([simple_K(8, 8)] * 3),
                                                    c2w=orbit(3, 10.0))})
    png = root / "scenes" / "a" / "images" / "000001.png"
    png.write_bytes(png.read_bytes()[:30])
    ds = SceneFolderDataset(root, num_views=3)
    with pytest.raises(SceneFolderError, match=re.escape(str(png))):
        ds[0]


def test_scene_with_too_few_frames_is_rejected(tmp_path):
    root = make_dataset(tmp_path / "ds", {"short": dict(images=index_images(3), K=np.stack([simple_K(8, 8)] * 3),
                                                        c2w=orbit(3, 10.0))})
    with pytest.raises(SceneFolderError, match=r"short/cameras\.json: field 'frames' has 3 frames"):
        SceneFolderDataset(root, num_views=4)
    with pytest.raises(SceneFolderError, match="fewer than the 5 needed"):
        SceneFolderDataset(root, num_views=3, frame_spacing=(2, 4))
    with pytest.raises(SceneFolderError, match=r"no split 'val'; available: \['train'\]"):
        SceneFolderDataset(root, num_views=2, split="val")


# ------------------------------------------------------------------------------------------------
# View sampling


STEP_DEG = 10.0  # azimuth change per frame of the orbit scene


@pytest.fixture
def orbit_dataset(tmp_path):
    F = 20
    return make_dataset(tmp_path / "ds", {
        "orbit": dict(images=index_images(F), K=np.stack([simple_K(8, 8)] * F), c2w=orbit(F, STEP_DEG)),
        "orbit2": dict(images=index_images(F), K=np.stack([simple_K(8, 8)] * F), c2w=orbit(F, STEP_DEG, 3.0, 35.0)),
    })


def test_views_are_references_first_with_spacing_respected(orbit_dataset):
    ds = SceneFolderDataset(orbit_dataset, num_views=4, num_ref=2, frame_spacing=(2, 3), seed=3,
                            samples_per_scene=10)
    c2w = {"orbit": orbit(20, STEP_DEG), "orbit2": orbit(20, STEP_DEG, 3.0, 35.0)}
    seen_gaps, seen_orders = set(), set()
    for i in range(len(ds)):
        item = ds[i]
        frames = decode_frames(item)
        assert item["num_ref"] == 2 and item["image"].shape == (4, 3, 8, 8)
        refs, targets = frames[:2], frames[2:]
        assert refs == sorted(refs) and targets == sorted(targets)  # frame order inside each group
        gaps = np.diff(sorted(frames))
        assert set(gaps.tolist()) <= {2, 3}
        seen_gaps |= set(gaps.tolist())
        seen_orders.add(tuple(np.argsort(frames)))
        scene = ["orbit", "orbit2"][i % 2]  # scenes alternate: item i is draw i // 2 of scene i % 2
        np.testing.assert_allclose(item["cam2world"].numpy(), c2w[scene][frames], atol=1e-6)
        assert ds.sample_frames(i) == (scene, frames)
    assert seen_gaps == {2, 3}
    assert len(seen_orders) > 1  # references are not always the earliest frames


def test_sampling_is_deterministic_per_seed_and_index(orbit_dataset):
    a = SceneFolderDataset(orbit_dataset, num_views=3, frame_spacing=(1, 4), seed=7, samples_per_scene=8)
    b = SceneFolderDataset(orbit_dataset, num_views=3, frame_spacing=(1, 4), seed=7, samples_per_scene=8)
    c = SceneFolderDataset(orbit_dataset, num_views=3, frame_spacing=(1, 4), seed=8, samples_per_scene=8)
    assert [decode_frames(a[i]) for i in (5, 2, 5)] == [decode_frames(b[i]) for i in (5, 2, 5)]
    assert [a.sample_frames(i) for i in range(16)] != [c.sample_frames(i) for i in range(16)]


def test_view_change_filter(orbit_dataset):
    lo, hi = 45.0, 65.0
    ds = SceneFolderDataset(orbit_dataset, num_views=3, num_ref=1, frame_spacing=(1, 6),
                            max_view_change_deg=(lo, hi), seed=0, samples_per_scene=10)
    for i in range(len(ds)):
        frames = decode_frames(ds[i])
        # orbit about the vertical axis: relative rotation = azimuth difference, whatever the elevation
        change = max(abs(frames[0] - t) * STEP_DEG for t in frames[1:])
        assert lo - 1e-6 <= change <= hi + 1e-6
    impossible = SceneFolderDataset(orbit_dataset, num_views=3, frame_spacing=(1, 2),
                                    max_view_change_deg=(100.0, 120.0))
    with pytest.raises(SceneFolderError, match=r"within \(100\.0, 120\.0\) deg"):
        impossible[0]


def test_view_change_filter_is_exact_at_tiny_angles(tmp_path):
    # two orbit frames 1e-4 deg apart: the relative rotation is exactly the azimuth step. The
    # acos((trace - 1) / 2) form is off by ~5e-5 relative here (float64 round-off near cos = 1), so
    # a window of +-1e-6 relative around the true angle tells the precise form from it.
    step = 1e-4
    c2w = orbit(2, step)
    root = make_dataset(tmp_path / "ds", {"tiny": dict(images=index_images(2), K=np.stack([simple_K(8, 8)] * 2),
                                                       c2w=c2w)})
    window = (step * (1 - 1e-6), step * (1 + 1e-6))
    R = c2w[:, :3, :3]
    acos_form = np.degrees(np.arccos(np.clip((np.trace(R[0].T @ R[1]) - 1) / 2, -1, 1)))
    assert not window[0] <= acos_form <= window[1]  # the case the acos form gets wrong
    ds = SceneFolderDataset(root, num_views=2, max_view_change_deg=window, max_tries=3)
    assert decode_frames(ds[0]) in ([0, 1], [1, 0])


# ------------------------------------------------------------------------------------------------
# Resizing


def _bilinear(image: np.ndarray, u: float, v: float) -> np.ndarray:
    """image [C, H, W] sampled at pixel-centre coordinates (u, v)."""
    x0, y0 = int(np.floor(u)), int(np.floor(v))
    ax, ay = u - x0, v - y0
    return ((1 - ax) * (1 - ay) * image[:, y0, x0] + ax * (1 - ay) * image[:, y0, x0 + 1]
            + (1 - ax) * ay * image[:, y0 + 1, x0] + ax * ay * image[:, y0 + 1, x0 + 1])


@pytest.mark.filterwarnings("ignore:.*centre-cropped")  # cropping to another aspect is what is tested
@pytest.mark.parametrize("mode,out_hw", [("center_crop", (8, 8)), ("stretch", (8, 12)), ("center_crop", (12, 9))])
def test_resize_updates_K_so_points_keep_their_content(tmp_path, mode, out_hw):
    """Images encode their own pixel-centre coordinates (R = (u + 0.5)/W, G = (v + 0.5)/H), a
    linear ramp that bilinear resampling preserves. A 3D point projected with the new K must land
    where the resized image still says "original pixel (u, v)" = its projection with the old K."""
    H, W = 24, 40
    u, v = np.meshgrid(np.arange(W), np.arange(H))
    ramp = np.stack([(u + 0.5) / W, (v + 0.5) / H, np.zeros_like(u, dtype=float)], -1)
    images = np.stack([np.rint(ramp * 255).astype(np.uint8)] * 2)
    K = np.array([[30.0, 0, 18.3], [0, 33.0, 12.9], [0, 0, 1]])
    c2w = orbit(2, 10.0)
    root = make_dataset(tmp_path / "ds", {"s": dict(images=images, K=np.stack([K, K]), c2w=c2w)})
    ds = SceneFolderDataset(root, num_views=2, image_size=out_hw, resize_mode=mode)
    item = ds[0]
    assert item["image"].shape[-2:] == out_hw
    frame = decode_frames_by_camera(item, c2w)
    K_new = item["intrinsics"][0].double().numpy()
    img = item["image"][0].double().numpy()
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(200):
        uv_orig = rng.uniform([2, 2], [W - 3, H - 3])
        ray = np.linalg.inv(K) @ np.append(uv_orig, 1.0)
        X = (c2w[frame] @ np.append(ray * 3.0, 1.0))[:3]  # a world point seen at uv_orig
        np.testing.assert_allclose(project(K, c2w[frame], X), uv_orig, atol=1e-9)
        u_new, v_new = project(K_new, c2w[frame], X)
        if not (1 <= u_new <= out_hw[1] - 2 and 1 <= v_new <= out_hw[0] - 2):
            continue  # outside the crop, or where the antialiasing kernel meets the border
        r, g, _ = _bilinear(img, u_new, v_new)
        np.testing.assert_allclose([r * W - 0.5, g * H - 0.5], uv_orig, atol=0.15)
        checked += 1
    assert checked > 20


def decode_frames_by_camera(item, c2w) -> int:
    return int(np.argmin([np.abs(item["cam2world"][0].numpy() - c).max() for c in c2w]))


# ------------------------------------------------------------------------------------------------
# Synthetic -> scene folder -> dataset, through the CLI


def test_synth_cli_round_trip(tmp_path):
    from cameo_bench.data.synthetic import SyntheticScenes

    out = tmp_path / "synth"
    args = ["data", "synth", "--scenes", "2", "--views", "3", "--size", "16", "--azimuth-step", "40",
            "--seed", "5", "--point-maps", str(out)]
    assert main(args) == 0
    index = json.loads((out / "dataset.json").read_text())
    assert index["format"] == "cameo_bench/scene-v1" and index["splits"] == {"train": ["000000", "000001"]}
    with pytest.raises(SceneFolderError, match="already exists"):
        main(args)

    reference = SyntheticScenes(2, 3, 16, 40.0, 5)
    ds = SceneFolderDataset(out, num_views=3, num_ref=1, point_map_source="synthetic")
    for i in range(2):
        scene_id, frames = ds.sample_frames(i)
        item, ref = ds[i], reference[int(scene_id)]
        assert sorted(frames) == [0, 1, 2]
        assert (item["image"] - ref["image"][frames]).abs().max() <= 0.5 / 255 + 1e-6
        torch.testing.assert_close(item["depth"], ref["depth"][frames], rtol=1e-3, atol=0)
        torch.testing.assert_close(item["intrinsics"], ref["intrinsics"][frames].float(), rtol=0, atol=1e-5)
        torch.testing.assert_close(item["cam2world"], ref["cam2world"][frames].float(), rtol=0, atol=1e-5)
        torch.testing.assert_close(item["point_map"], ref["point_map"][frames], rtol=1e-3, atol=1e-3)
