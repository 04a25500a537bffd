"""Converters: each test writes a fixture in the *foreign* format, from that format's documented
definition, for known OpenCV cameras, converts it through the CLI and checks that the cameras come
back to 1e-5 and that a known 3D point lands on the pixel the foreign projection model predicts.

Foreign conventions used below (written from the format documentation, not from the converter):
* RealEstate10K: `timestamp fx fy cx cy k1 k2` + 3x4 world-to-camera row-major; fx, cx are
  normalised by the image width, fy, cy by its height; OpenCV axes. Pixel i's centre has the
  normalised coordinate (i + 0.5) / W (pixelSplat's `sample_image_grid`).
* CO3Dv2 / PyTorch3D (pytorch3d.org/docs/cameras): row vectors, X_view = X_world @ R + T; view
  axes +X left, +Y up, +Z forward; x_ndc = f_x X/Z + p_x; NDC +-1 on the outer pixel edges of the
  shorter side (`ndc_isotropic`) or of each side (`ndc_norm_image_bounds`); screen space has
  (0, 0) at the top-left corner of the top-left pixel, so the OpenCV coordinate is screen - 0.5.
  Depth: 16-bit PNG holding float16 bits, times scale_adjustment; depth mask PNG.
* COLMAP (colmap.github.io/format.html): images.txt holds world-to-camera QW QX QY QZ TX TY TZ
  (Hamilton unit quaternion), cameras.txt PINHOLE fx fy cx cy / SIMPLE_PINHOLE f cx cy, with the
  centre of the top-left pixel at (0.5, 0.5).
"""
from __future__ import annotations

import gzip
import json
import re

import cv2
import numpy as np
import pytest

from cameo_bench.__main__ import main
from cameo_bench.data.scene_format import read_dataset_index, read_scene, scene_dir

H, W = 24, 32  # non-square, so x/y and width/height mix-ups show
POINTS = np.array([[0.3, -0.2, 0.4], [-0.5, 0.6, 0.1], [0.1, 0.1, -0.3]])  # world points seen by every camera


def look_at(eye, target=(0.0, 0.0, 0.0), up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """OpenCV camera-to-world (x right, y down, z towards the target; world z up)."""
    eye, target, up = (np.asarray(v, dtype=np.float64) for v in (eye, target, up))
    z = (target - eye) / np.linalg.norm(target - eye)
    x = np.cross(z, up)
    x /= np.linalg.norm(x)
    c2w = np.eye(4)
    c2w[:3, :3] = np.stack([x, np.cross(z, x), z], axis=1)
    c2w[:3, 3] = eye
    return c2w


def known_cameras():
    eyes = [(3.0, 0.5, 1.2), (2.0, 2.5, 0.8), (-0.5, 3.2, 1.6)]
    c2w = np.stack([look_at(e) for e in eyes])
    K = np.stack([
        np.array([[28.0 + 2 * i, 0, 15.2 - i], [0, 30.0 + i, 11.7 + 0.5 * i], [0, 0, 1]]) for i in range(3)
    ])
    return K, c2w


def opencv_project(K, c2w, X) -> np.ndarray:
    Xc = np.linalg.inv(c2w) @ np.append(X, 1.0)
    uvw = K @ Xc[:3]
    return uvw[:2] / uvw[2]


def frame_images(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, H, W, 3), dtype=np.uint8)


def save_rgb(path, rgb):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1]))  # cv2 writes BGR


def convert(fmt, src, out):
    assert main(["data", "convert", "--format", fmt, str(src), str(out)]) == 0
    return read_dataset_index(out)


def check_scene(scene, K, c2w, images=None):
    np.testing.assert_allclose(scene.K, K, atol=1e-5)
    np.testing.assert_allclose(scene.c2w, c2w, atol=1e-5)
    if images is not None:
        np.testing.assert_array_equal(np.stack(scene.images), images)


# ------------------------------------------------------------------------------------------------
# RealEstate10K


def write_re10k_clip(folder, clip, K, c2w, images, timestamps, suffix=".png"):
    lines = ["https://www.youtube.com/watch?v=test"]
    for ts, k, pose, image in zip(timestamps, K, c2w, images):
        w2c = np.linalg.inv(pose)[:3]  # 3x4 world-to-camera
        intr = [k[0, 0] / W, k[1, 1] / H, (k[0, 2] + 0.5) / W, (k[1, 2] + 0.5) / H, 0.0, 0.0]
        lines.append(" ".join([str(ts)] + [repr(float(v)) for v in intr + w2c.reshape(-1).tolist()]))
        save_rgb(folder / clip / f"{ts}{suffix}", image)
    (folder / f"{clip}.txt").write_text("\n".join(lines) + "\n")


def test_re10k(tmp_path):
    K, c2w = known_cameras()
    images = frame_images(3)
    timestamps = [33366667, 66733333, 100100000]
    write_re10k_clip(tmp_path / "src" / "train", "clipA", K, c2w, images, timestamps)
    write_re10k_clip(tmp_path / "src" / "test", "clipB", K[::-1], c2w[::-1], images[::-1], timestamps)
    index = convert("re10k", tmp_path / "src", tmp_path / "out")
    assert index["splits"] == {"test": ["clipB"], "train": ["clipA"]}
    scene = read_scene(scene_dir(tmp_path / "out", "clipA"))
    check_scene(scene, K, c2w, images)
    assert scene.meta["timestamps"] == [str(t) for t in timestamps]
    check_scene(read_scene(scene_dir(tmp_path / "out", "clipB")), K[::-1], c2w[::-1], images[::-1])
    lines = (tmp_path / "src" / "train" / "clipA.txt").read_text().splitlines()[1:]
    for i, X in enumerate(POINTS):
        # the RE10K / pixelSplat projection: w2c, normalised intrinsics, then pixel index = x W - 0.5
        v = np.array([float(t) for t in lines[i].split()[1:]])
        Xc = v[6:].reshape(3, 4) @ np.append(X, 1)
        xn = [v[0] * Xc[0] / Xc[2] + v[2], v[1] * Xc[1] / Xc[2] + v[3]]
        expected = [xn[0] * W - 0.5, xn[1] * H - 0.5]
        np.testing.assert_allclose(opencv_project(scene.K[i], scene.c2w[i], X), expected, atol=1e-5)


def failed_convert(capsys, *args) -> str:
    """Run `data convert`, expect exit code 2 and one line on stderr; return the line."""
    assert main(["data", "convert", *map(str, args)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cameo-bench data convert: error: ")
    return err[0]


def test_re10k_failure_names_the_file_and_leaves_nothing(tmp_path, capsys):
    K, c2w = known_cameras()
    src = tmp_path / "src"
    write_re10k_clip(src, "good", K, c2w, frame_images(3), [1, 2, 3], suffix=".jpg")
    write_re10k_clip(src, "zbroken", K, c2w, frame_images(3), [1, 2, 3])
    (src / "zbroken" / "2.png").unlink()
    err = failed_convert(capsys, "--format", "re10k", src, tmp_path / "out")
    assert re.search(re.escape(str(src / "zbroken" / "2")) + r"\.png\|jpg", err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no temporary folder

    lines = (src / "good.txt").read_text().splitlines()
    fields = lines[2].split()
    fields[7] = "2.0"  # r11: the rotation is no longer orthonormal
    lines[2] = " ".join(fields)
    (src / "good.txt").write_text("\n".join(lines))
    (src / "zbroken.txt").unlink()
    err = failed_convert(capsys, "--format", "re10k", src, tmp_path / "out")
    assert re.search(re.escape(f"{src / 'good.txt'}:3") + ".*not a rigid", err)
    # an option the format does not read is refused, not ignored
    err = failed_convert(capsys, "--format", "re10k", "--skip-missing", src, tmp_path / "out")
    assert "--skip-missing does not apply to --format re10k (it applies to: nerfstudio)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# ------------------------------------------------------------------------------------------------
# CO3Dv2


def pytorch3d_viewpoint(K, c2w, fmt):
    """A PyTorch3D camera built from the geometry of the OpenCV one, per the PyTorch3D docs."""
    axes_cv = c2w[:3, :3]  # columns: camera x (right), y (down), z (forward) in world coordinates
    axes_p3d = np.stack([-axes_cv[:, 0], -axes_cv[:, 1], axes_cv[:, 2]], axis=1)  # +X left, +Y up
    centre = c2w[:3, 3]
    # row-vector world -> view: X_view_j = (X_world - centre) . axis_j, i.e. X_world @ R + T
    R = axes_p3d
    T = -centre @ axes_p3d
    sx, sy = (min(H, W) / 2.0,) * 2 if fmt == "ndc_isotropic" else (W / 2.0, H / 2.0)
    # NDC of a screen point (corner convention, +x_ndc to the left, +y_ndc up): ndc = (W/2 - screen)/s
    screen_c = K[:2, 2] + 0.5
    p = [(W / 2.0 - screen_c[0]) / sx, (H / 2.0 - screen_c[1]) / sy]
    f = [K[0, 0] / sx, K[1, 1] / sy]
    return {"R": R.tolist(), "T": T.tolist(), "focal_length": f, "principal_point": p, "intrinsics_format": fmt}


def pytorch3d_project_to_opencv_pixel(vp, X):
    """World point -> PyTorch3D view -> NDC -> screen (corner convention) -> OpenCV pixel centre."""
    Xv = np.asarray(X) @ np.asarray(vp["R"]) + np.asarray(vp["T"])
    ndc = np.asarray(vp["focal_length"]) * Xv[:2] / Xv[2] + np.asarray(vp["principal_point"])
    sx, sy = (min(H, W) / 2.0,) * 2 if vp["intrinsics_format"] == "ndc_isotropic" else (W / 2.0, H / 2.0)
    screen = np.array([W / 2.0 - ndc[0] * sx, H / 2.0 - ndc[1] * sy])
    return screen - 0.5


def write_co3d(root, category, sequence, K, c2w, images, depth, depth_mask, fmt, scale):
    frames = []
    for i in range(len(images)):
        base = f"{category}/{sequence}"
        save_rgb(root / base / "images" / f"frame{i:06d}.jpg", images[i])
        bits = (depth[i] / scale).astype(np.float16).view(np.uint16)  # float16 bits in a 16-bit PNG
        (root / base / "depths").mkdir(exist_ok=True)
        (root / base / "depth_masks").mkdir(exist_ok=True)
        cv2.imwrite(str(root / base / "depths" / f"frame{i:06d}.jpg.geometric.png"), bits)
        cv2.imwrite(str(root / base / "depth_masks" / f"frame{i:06d}.png"), depth_mask[i].astype(np.uint8) * 255)
        frames.append({
            "sequence_name": sequence, "frame_number": 10 - i,  # reverse order on purpose
            "frame_timestamp": 0.1 * i,
            "image": {"path": f"{base}/images/frame{i:06d}.jpg", "size": [H, W]},
            "depth": {"path": f"{base}/depths/frame{i:06d}.jpg.geometric.png", "scale_adjustment": scale,
                      "mask_path": f"{base}/depth_masks/frame{i:06d}.png"},
            "mask": None,
            "viewpoint": pytorch3d_viewpoint(K[i], c2w[i], fmt),
            "meta": {},
        })
    with gzip.open(root / category / "frame_annotations.jgz", "wt") as f:
        json.dump(frames, f)
    return frames


@pytest.mark.parametrize("fmt", ["ndc_isotropic", "ndc_norm_image_bounds"])
def test_co3dv2(tmp_path, fmt):
    K, c2w = known_cameras()
    rng = np.random.default_rng(1)
    images = frame_images(3)
    depth = rng.uniform(0.5, 8.0, (3, H, W)).astype(np.float32)
    depth_mask = rng.uniform(size=(3, H, W)) > 0.3
    scale = 1.7
    frames = write_co3d(tmp_path / "co3d", "teddybear", "42_1_2", K, c2w, images, depth, depth_mask, fmt, scale)
    index = convert("co3dv2", tmp_path / "co3d", tmp_path / "out")
    assert index["splits"] == {"train": ["teddybear/42_1_2"]}
    scene = read_scene(scene_dir(tmp_path / "out", "teddybear/42_1_2"))
    order = [2, 1, 0]  # by frame_number
    check_scene(scene, K[order], c2w[order])
    for n, i in enumerate(order):
        for X in POINTS:
            expected = pytorch3d_project_to_opencv_pixel(frames[i]["viewpoint"], X)
            np.testing.assert_allclose(opencv_project(scene.K[n], scene.c2w[n], X), expected, atol=1e-5)
        want = np.where(depth_mask[i], depth[i], 0)
        np.testing.assert_allclose(scene.depth[n], want, rtol=2e-3)
        assert (scene.depth[n][~depth_mask[i]] == 0).all()
        source = cv2.imread(str(tmp_path / "co3d" / frames[i]["image"]["path"]))[..., ::-1]
        assert np.abs(scene.images[n].astype(int) - source).mean() < 1  # the jpg, copied as is
    assert scene.cameras.depth_source == "mvs"
    assert scene.meta["frame_numbers"] == [8, 9, 10]


def test_co3dv2_point_above_scene_is_above_image_centre(tmp_path):
    """The +Y up / +X left flips: a point straight above the look-at target must appear above the
    principal point, and a point to the camera's right must appear right of it."""
    K, c2w = known_cameras()
    write_co3d(tmp_path / "co3d", "cat", "s", K, c2w, frame_images(3), np.ones((3, H, W)),
               np.ones((3, H, W), bool), "ndc_isotropic", 1.0)
    convert("co3dv2", tmp_path / "co3d" / "cat", tmp_path / "out")  # a single category folder
    scene = read_scene(scene_dir(tmp_path / "out", "cat/s"))
    for n in range(3):
        right = scene.c2w[n][:3, 0]  # camera x axis in world
        u, v = opencv_project(scene.K[n], scene.c2w[n], np.array([0, 0, 0.5]))
        assert v < scene.K[n][1, 2] - 1
        u_r, _ = opencv_project(scene.K[n], scene.c2w[n], 0.5 * right)
        assert u_r > scene.K[n][0, 2] + 1


# ------------------------------------------------------------------------------------------------
# COLMAP


def axis_angle(axis, angle):
    """(rotation matrix by Rodrigues' formula, Hamilton quaternion w x y z) of the same rotation."""
    axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    R = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    q = np.concatenate([[np.cos(angle / 2)], np.sin(angle / 2) * axis])
    return R, q


def write_colmap(scene, K, w2c_list, names, images, model="sparse/0", distortion=None):
    model_dir = scene / model
    model_dir.mkdir(parents=True)
    cam_lines = ["# Camera list with one line of data per camera:"]
    img_lines = ["# Image list with two lines of data per image:"]
    for i, ((R, q, t), name) in enumerate(zip(w2c_list, names)):
        fx, fy, cx, cy = K[i, 0, 0], K[i, 1, 1], K[i, 0, 2] + 0.5, K[i, 1, 2] + 0.5  # COLMAP centres
        if distortion is not None and i == 0:
            cam_lines.append(f"{i + 1} OPENCV {W} {H} {fx} {fy} {cx} {cy} {distortion} 0 0 0")
        elif fx == fy:
            cam_lines.append(f"{i + 1} SIMPLE_PINHOLE {W} {H} {fx} {cx} {cy}")
        else:
            cam_lines.append(f"{i + 1} PINHOLE {W} {H} {fx:.17g} {fy:.17g} {cx:.17g} {cy:.17g}")
        img_lines.append(" ".join([str(i + 1)] + [repr(float(v)) for v in (*q, *t)] + [str(i + 1), name]))
        img_lines.append("")  # an image with no 2D points: an empty line that must not be skipped
        save_rgb(scene / "images" / name, images[i])
    (model_dir / "cameras.txt").write_text("\n".join(cam_lines) + "\n")
    (model_dir / "images.txt").write_text("\n".join(img_lines) + "\n")
    (model_dir / "points3D.txt").write_text("# 3D point list\n1 0.3 -0.2 0.4 255 0 0 0.1 1 0\n")


def colmap_poses():
    poses = []
    for axis, angle, t in [((0, 0, 1), 0.3, (0.1, -0.2, 3.0)), ((1, 1, 0), -0.5, (0.4, 0.0, 2.5)),
                           ((0.2, 1, 0.3), 2.8, (-0.3, 0.2, 3.5))]:
        R, q = axis_angle(axis, angle)
        poses.append((R, q, np.array(t)))
    return poses


def test_colmap(tmp_path):
    K, _ = known_cameras()
    K[1, 1, 1] = K[1, 0, 0]  # one SIMPLE_PINHOLE camera
    poses = colmap_poses()
    images = frame_images(3)
    names = ["c.png", "a.png", "b.png"]  # frames are ordered by name
    for scene in ("scan1", "group/scan2"):
        write_colmap(tmp_path / "src" / scene, K, poses, names, images)
    index = convert("colmap", tmp_path / "src", tmp_path / "out")
    assert index["splits"] == {"train": ["group/scan2", "scan1"]}
    scene = read_scene(scene_dir(tmp_path / "out", "scan1"))
    order = [1, 2, 0]
    c2w = np.stack([np.linalg.inv(np.block([[R, t[:, None]], [np.zeros((1, 3)), np.ones((1, 1))]]))
                    for R, _, t in poses])
    check_scene(scene, K[order], c2w[order], images[order])
    assert scene.meta["num_points3d"] == 1 and scene.meta["images"] == ["a.png", "b.png", "c.png"]
    for n, i in enumerate(order):
        R, _, t = poses[i]
        for X in POINTS:
            Xc = R @ X + t
            colmap_pixel = np.array([K[i, 0, 0] * Xc[0] / Xc[2] + K[i, 0, 2] + 0.5,
                                     K[i, 1, 1] * Xc[1] / Xc[2] + K[i, 1, 2] + 0.5])
            np.testing.assert_allclose(opencv_project(scene.K[n], scene.c2w[n], X), colmap_pixel - 0.5,
                                       atol=1e-5)


def test_cli_formats_match_the_registry():
    from cameo_bench.cli.data import FORMATS
    from cameo_bench.data.converters import get_converter, list_converters

    assert sorted(FORMATS) == list_converters()
    with pytest.raises(ValueError, match=r"unknown converter 'colmp' \(did you mean 'colmap'\?\)"):
        get_converter("colmp")


def test_colmap_zero_distortion_is_kept_as_is(tmp_path):
    """A distortion model whose parameters are all 0 is a pinhole camera: no resampling."""
    K, _ = known_cameras()
    images = frame_images(3)
    write_colmap(tmp_path / "s", K, colmap_poses(), ["a.png", "b.png", "c.png"], images, distortion=0.0)
    convert("colmap", tmp_path / "s", tmp_path / "out")
    scene = read_scene(scene_dir(tmp_path / "out", "s"))
    assert scene.meta["camera_models"] == ["OPENCV", "PINHOLE", "SIMPLE_PINHOLE"] and not scene.meta["undistorted"]
    np.testing.assert_array_equal(np.stack(scene.images), images)
    np.testing.assert_allclose(scene.K, K, atol=1e-5)
