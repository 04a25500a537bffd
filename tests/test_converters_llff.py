"""LLFF converter on a poses_bounds.npy written here from LLFF's definition (its README and
imgs2poses.py): one row per image, in the images' plain sorted name order, holding a 3x5 matrix
row-major [R | t | hwf] (R's columns: the camera's down, right and backwards axes in world
coordinates; t its centre; hwf = height, width, focal in full-size pixels) and near, far bounds.
The principal point is the image centre: a point on the optical axis lands at the middle of the
image, (W - 1)/2 in pixel-index coordinates."""
from __future__ import annotations

import numpy as np
from converter_fixtures import look_at, opencv_project, save_rgb

from cameo_bench.__main__ import main
from cameo_bench.data.scene_format import read_scene, scene_dir

H, W, F = 48, 64, 55.0
NAMES = ["img10.png", "img2.png", "img1.png"]


def write_llff(scene, c2ws, names, folder="images", size=(H, W)):
    rows = []
    for c2w in c2ws:
        right, down, forward = c2w[:3, 0], c2w[:3, 1], c2w[:3, 2]
        pose = np.stack([down, right, -forward, c2w[:3, 3], [H, W, F]], axis=1)  # 3x5
        rows.append(np.concatenate([pose.reshape(-1), [0.5, 9.0]]))
    order = np.argsort(names)  # rows follow the plain sorted names
    scene.mkdir(parents=True, exist_ok=True)
    np.save(scene / "poses_bounds.npy", np.stack(rows)[order].astype(np.float64))
    for i, name in enumerate(names):
        save_rgb(scene / folder / name, np.full((*size, 3), 20 * i, np.uint8))


def llff_pixel(c2w, X):
    """LLFF's camera: centre-origin image plane, u = W/2 + f right/forward in corner coordinates."""
    d = X - c2w[:3, 3]
    right, down, forward = d @ c2w[:3, 0], d @ c2w[:3, 1], d @ c2w[:3, 2]
    return np.array([W / 2 + F * right / forward - 0.5, H / 2 + F * down / forward - 0.5])


def test_llff(tmp_path):
    c2ws = [look_at((3.0, 0.3 * i, 1.0), target=(0, 0.1 * i, 0)) for i in range(3)]
    write_llff(tmp_path / "fern", c2ws, NAMES)
    assert main(["data", "convert", "--format", "llff", str(tmp_path / "fern"), str(tmp_path / "out")]) == 0
    scene = read_scene(scene_dir(tmp_path / "out", "fern"))
    assert scene.meta["images"] == ["img1.png", "img2.png", "img10.png"]
    by_name = dict(zip(NAMES, c2ws))
    for n, name in enumerate(scene.meta["images"]):
        np.testing.assert_allclose(scene.c2w[n], by_name[name], atol=1e-9)
        np.testing.assert_allclose(scene.K[n], [[F, 0, (W - 1) / 2], [0, F, (H - 1) / 2], [0, 0, 1]])
        assert scene.images[n][0, 0, 0] == 20 * NAMES.index(name)
        for X in np.random.default_rng(n).uniform(-0.5, 0.5, (5, 3)):
            np.testing.assert_allclose(opencv_project(scene.K[n], scene.c2w[n], X[None])[0],
                                       llff_pixel(by_name[name], X), atol=1e-9)
    assert scene.meta["bounds"] == [[0.5, 9.0]] * 3


def test_llff_downscaled_copy_and_count_mismatch(tmp_path, capsys):
    c2ws = [look_at((3.0, 0.3 * i, 1.0)) for i in range(3)]
    write_llff(tmp_path / "s", c2ws, NAMES, folder="images_4", size=(H // 4, W // 4))
    assert main(["data", "convert", "--format", "llff", "--downscale", "4", str(tmp_path / "s"),
                 str(tmp_path / "out")]) == 0
    scene = read_scene(scene_dir(tmp_path / "out", "s"))
    np.testing.assert_allclose(scene.K[0], [[F / 4, 0, (W / 4 - 1) / 2], [0, F / 4, (H / 4 - 1) / 2], [0, 0, 1]])
    (tmp_path / "s" / "images_4" / "img2.png").unlink()
    assert main(["data", "convert", "--format", "llff", "--downscale", "4", str(tmp_path / "s"),
                 str(tmp_path / "out2")]) == 2
    assert f"{tmp_path / 's' / 'poses_bounds.npy'}: 3 poses but 2 images in" in capsys.readouterr().err
