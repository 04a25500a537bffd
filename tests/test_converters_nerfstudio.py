"""nerfstudio / instant-ngp `transforms.json` converter on files written here from the format's
definition (nerfstudio docs "Data conventions", instant-ngp's nerf_loader):

* `transform_matrix` is camera-to-world with OpenGL camera axes: +X right, +Y up, +Z backwards
  (the camera looks along -Z);
* intrinsics `fl_x fl_y cx cy w h` in pixels, or `camera_angle_x` (horizontal field of view):
  fl_x = 0.5 w / tan(0.5 camera_angle_x); the ray of pixel (i, j) passes through (i + 0.5, j + 0.5),
  i.e. cx is measured from the image corner;
* distortion k1 k2 p1 p2 (OpenCV's radial-tangential model, in the corner coordinates above);
* `file_path` relative to the json's folder, NeRF-synthetic without the suffix; per-frame
  intrinsics override the shared ones; nerfstudio's downsampled copies live in images_N/.
"""
from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
from converter_fixtures import blob_centroid, look_at, opencv_project, render_blobs, save_rgb
from PIL import Image

from cameo_bench.__main__ import main
from cameo_bench.data.scene_format import read_dataset_index, read_scene, scene_dir

W, H = 80, 60
POINTS = np.random.default_rng(3).uniform(-0.6, 0.6, (40, 3))


def cameras(n):
    return [look_at((3.0 * math.cos(0.4 * i), 3.0 * math.sin(0.4 * i), 0.8 + 0.1 * i)) for i in range(n)]


def opengl(c2w_cv):
    """The same camera with OpenGL axes: x stays, y up = -y_cv, z backwards = -z_cv."""
    gl = c2w_cv.copy()
    gl[:3, 1], gl[:3, 2] = -c2w_cv[:3, 1], -c2w_cv[:3, 2]
    return gl


def nerfstudio_pixel(gl, fx, fy, cx, cy, X):
    """nerfstudio's camera model run forward: world -> OpenGL camera -> corner-origin pixel -> index."""
    Xc = np.linalg.inv(gl) @ np.append(X, 1.0)
    depth = -Xc[2]  # looks along -Z
    u_corner = fx * Xc[0] / depth + cx
    v_corner = -fy * Xc[1] / depth + cy  # +Y up, image rows go down
    return np.array([u_corner - 0.5, v_corner - 0.5])  # pixel (i, j) is the square [i, i + 1)


def convert(src, out, *extra):
    assert main(["data", "convert", "--format", "nerfstudio", str(src), str(out), *extra]) == 0
    return read_dataset_index(out)


def test_nerfstudio_shared_intrinsics_and_natural_order(tmp_path):
    c2ws = cameras(3)
    fx, fy, cx, cy = 70.0, 69.0, 41.3, 29.8
    names = ["images/frame_10.png", "images/frame_2.png", "images/frame_1.png"]
    rng = np.random.default_rng(0)
    frames = []
    for name, c2w in zip(names, c2ws):
        save_rgb(tmp_path / "cap" / name, rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
        frames.append({"file_path": name, "transform_matrix": opengl(c2w).tolist()})
    data = {"camera_model": "OPENCV", "fl_x": fx, "fl_y": fy, "cx": cx, "cy": cy, "w": W, "h": H,
            "k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0, "frames": frames}
    (tmp_path / "cap" / "transforms.json").write_text(json.dumps(data))
    assert convert(tmp_path / "cap" / "transforms.json", tmp_path / "out")["splits"] == {"train": ["cap"]}
    scene = read_scene(scene_dir(tmp_path / "out", "cap"))
    order = [2, 1, 0]  # frame_1, frame_2, frame_10
    assert scene.meta["file_paths"] == [names[i] for i in order]
    for n, i in enumerate(order):
        np.testing.assert_allclose(scene.c2w[n], c2ws[i], atol=1e-5)
        np.testing.assert_allclose(scene.K[n], [[fx, 0, cx - 0.5], [0, fy, cy - 0.5], [0, 0, 1]], atol=1e-5)
        gl = np.array(frames[i]["transform_matrix"])
        for X in POINTS[:5]:
            np.testing.assert_allclose(opencv_project(scene.K[n], scene.c2w[n], X[None])[0],
                                       nerfstudio_pixel(gl, fx, fy, cx, cy, X), atol=1e-5)
        source = cv2.imread(str(tmp_path / "cap" / names[i]))[..., ::-1]
        np.testing.assert_array_equal(scene.images[n], source)
    # a point straight above the scene appears above the principal point (the y flip is right)
    assert opencv_project(scene.K[0], scene.c2w[0], np.array([[0, 0, 1.0]]))[0, 1] < scene.K[0][1, 2] - 1


def test_nerfstudio_per_frame_intrinsics_with_distortion(tmp_path):
    """instant-ngp-style per-frame cameras with k1 k2 p1 p2: undistorted on conversion, blobs rendered
    through the distorted camera land where the stored pinhole camera projects their 3D points."""
    c2ws = cameras(2)
    intr = [(70.0, 70.0, 40.2, 30.1, -0.12, 0.02, 0.001, -0.002), (64.0, 65.0, 39.7, 30.6, -0.08, 0.0, 0.0, 0.0)]
    frames, chosen = [], []
    for n, (c2w, (fx, fy, cx, cy, k1, k2, p1, p2)) in enumerate(zip(c2ws, intr)):
        Xc = (POINTS - c2w[:3, 3]) @ c2w[:3, :3]  # OpenCV camera coordinates of the same camera
        xn = Xc[:, :2] / Xc[:, 2:3]
        ideal = np.stack([fx * xn[:, 0] + cx, fy * xn[:, 1] + cy], 1)
        pick = []
        for p in np.argsort(-np.abs(ideal - [W / 2, H / 2]).max(1)):
            inner = 12 < ideal[p, 0] < W - 12 and 12 < ideal[p, 1] < H - 12
            if inner and all(np.linalg.norm(ideal[p] - ideal[q]) > 16 for q in pick):
                pick.append(p)
        chosen.append(pick[:4])
        img = render_blobs("OPENCV", [fx, fy, cx, cy, k1, k2, p1, p2], W, H, xn[pick[:4]], 1.6)
        save_rgb(tmp_path / "ngp" / f"img{n}.png", img)
        frames.append({"file_path": f"img{n}.png", "transform_matrix": opengl(c2w).tolist(), "fl_x": fx, "fl_y": fy,
                       "cx": cx, "cy": cy, "w": W, "h": H, "k1": k1, "k2": k2, "p1": p1, "p2": p2})
    (tmp_path / "ngp" / "transforms.json").write_text(json.dumps({"aabb_scale": 4, "frames": frames}))
    convert(tmp_path / "ngp", tmp_path / "out")
    scene = read_scene(scene_dir(tmp_path / "out", "ngp"))
    assert scene.meta["undistorted"]
    errors = []
    for n, (fx, fy, cx, cy, k1, k2, p1, p2) in enumerate(intr):
        K = np.array([[fx, 0, cx - 0.5], [0, fy, cy - 0.5], [0, 0, 1]])
        K_new, _ = cv2.getOptimalNewCameraMatrix(K, np.array([k1, k2, p1, p2, 0.0]), (W, H), 0, (W, H))
        np.testing.assert_allclose(scene.K[n], K_new, atol=1e-5)
        np.testing.assert_allclose(scene.c2w[n], c2ws[n], atol=1e-5)
        for p in chosen[n]:
            want = opencv_project(scene.K[n], scene.c2w[n], POINTS[p][None])[0]
            errors.append(np.linalg.norm(blob_centroid(scene.images[n][..., 0], want) - want))
    print(f"nerfstudio distortion: blob centroid error max {max(errors):.3f} px")
    assert len(errors) >= 6 and max(errors) < 0.1


def test_nerf_synthetic_camera_angle_x_splits_and_alpha(tmp_path):
    c2ws = cameras(4)
    angle = 0.69
    for split, idx in (("train", [0, 1]), ("test", [2, 3])):
        frames = []
        for k, i in enumerate(idx):
            rgba = np.zeros((H, W, 4), np.uint8)
            rgba[10:30, 20:50] = (200, 40, 10, 255)  # an opaque patch on a transparent background
            rgba[30:40, 20:50] = (0, 0, 200, 128)
            (tmp_path / "lego" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgba, "RGBA").save(tmp_path / "lego" / split / f"r_{k}.png")
            frames.append({"file_path": f"./{split}/r_{k}", "rotation": 0.01,
                           "transform_matrix": opengl(c2ws[i]).tolist()})
        data = {"camera_angle_x": angle, "frames": frames}
        (tmp_path / "lego" / f"transforms_{split}.json").write_text(json.dumps(data))
    index = convert(tmp_path / "lego", tmp_path / "out")
    assert index["splits"] == {"test": ["lego/test"], "train": ["lego/train"]}
    scene = read_scene(scene_dir(tmp_path / "out", "lego/test"))
    f = 0.5 * W / math.tan(0.5 * angle)
    np.testing.assert_allclose(scene.K[0], [[f, 0, (W - 1) / 2], [0, f, (H - 1) / 2], [0, 0, 1]], atol=1e-9)
    np.testing.assert_allclose(scene.c2w, np.stack(c2ws[2:]), atol=1e-5)
    image, mask = scene.images[0], scene.masks[0]
    assert (image[0, 0] == 255).all() and (mask[0, 0] == 0)  # background: white, mask 0
    assert tuple(image[15, 30]) == (200, 40, 10) and mask[15, 30] == 255
    np.testing.assert_allclose(image[35, 30], [127, 127, 227], atol=1)  # half alpha over white
    assert scene.meta["alpha_over_white"]


def write_dl3dv(root, n=3, size=(H, W), missing=()):
    """DL3DV's nerfstudio layout: <hash>/nerfstudio/{transforms.json, images/, images_2/}."""
    folder = root / "0a1b2c" / "nerfstudio"
    frames = []
    for i, c2w in enumerate(cameras(n)):
        name = f"images/frame_{i + 1:05d}.png"
        if i not in missing:
            save_rgb(folder / name, np.full((*size, 3), 40 * i, np.uint8))
            save_rgb(folder / "images_2" / f"frame_{i + 1:05d}.png", np.full((size[0] // 2, size[1] // 2, 3), 40 * i,
                                                                            np.uint8))
        frames.append({"file_path": name, "transform_matrix": opengl(c2w).tolist(), "colmap_im_id": i + 1})
    data = {"w": size[1], "h": size[0], "fl_x": 60.0, "fl_y": 61.0, "cx": 40.0, "cy": 30.0, "k1": 0, "k2": 0,
            "p1": 0, "p2": 0, "camera_model": "OPENCV", "frames": frames,
            "applied_transform": [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, -1, 0]]}
    (folder / "transforms.json").write_text(json.dumps(data))
    return folder


def test_dl3dv_layout_and_downscaled_copy(tmp_path):
    folder = write_dl3dv(tmp_path / "dl3dv")
    assert convert(tmp_path / "dl3dv", tmp_path / "out")["splits"] == {"train": ["0a1b2c"]}
    assert convert(folder / "transforms.json", tmp_path / "one")["splits"] == {"train": ["0a1b2c"]}
    scene = read_scene(scene_dir(tmp_path / "out", "0a1b2c"))
    np.testing.assert_allclose(scene.K[0], [[60, 0, 39.5], [0, 61, 29.5], [0, 0, 1]])
    assert scene.meta["applied_transform"][2] == [0, 0, -1, 0]
    convert(tmp_path / "dl3dv", tmp_path / "half", "--downscale", "2")
    half = read_scene(scene_dir(tmp_path / "half", "0a1b2c"))
    assert half.images[0].shape == (H // 2, W // 2, 3)
    # corner-origin coordinates halve: f/2, cx/2; ours = cx/2 - 0.5
    np.testing.assert_allclose(half.K[0], [[30, 0, 19.5], [0, 30.5, 14.5], [0, 0, 1]])
    np.testing.assert_allclose(half.c2w, scene.c2w)


def test_nerfstudio_missing_frames_listed_or_skipped(tmp_path, capsys):
    folder = write_dl3dv(tmp_path / "dl3dv", n=5, missing=(1, 3))
    assert main(["data", "convert", "--format", "nerfstudio", str(tmp_path / "dl3dv"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert (f"{folder / 'transforms.json'}: 2 listed image files do not exist: frames[1].file_path "
            "'images/frame_00002.png'; frames[3].file_path 'images/frame_00004.png'; pass --skip-missing") in err
    assert not (tmp_path / "out").exists()
    convert(tmp_path / "dl3dv", tmp_path / "out", "--skip-missing")
    scene = read_scene(scene_dir(tmp_path / "out", "0a1b2c"))
    assert len(scene.images) == 3 and len(scene.meta["skipped_missing"]) == 2


@pytest.mark.parametrize("field, value, message", [
    ("camera_model", "OPENCV_FISHEYE", "field 'camera_model' is 'OPENCV_FISHEYE'"),
    ("fl_x", "wide", "field 'fl_x' must be a number"),
    ("k4", 0.1, "field 'k4' = 0.1 is not supported"),
])
def test_nerfstudio_bad_fields_are_named(tmp_path, capsys, field, value, message):
    folder = write_dl3dv(tmp_path / "d")
    data = json.loads((folder / "transforms.json").read_text())
    data["frames"][1][field] = value
    (folder / "transforms.json").write_text(json.dumps(data))
    assert main(["data", "convert", "--format", "nerfstudio", str(tmp_path / "d"), str(tmp_path / "out")]) == 2
    assert f"{folder / 'transforms.json'}: frames[1]: {message}" in capsys.readouterr().err
