"""COLMAP converter on reconstructions written here in COLMAP's own text and binary layouts
(tests/converter_fixtures.py): cameras round-trip, points3D tracks are stored and reproject onto
their observations, distorted cameras are undistorted (images and tracks alike), COLMAP's
half-pixel convention is undone, images are found where COLMAP keeps them, frames sort naturally."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from converter_fixtures import (
    blob_centroid,
    colmap_focal_centre,
    make_capture,
    opencv_project,
    render_blobs,
    save_rgb,
    write_colmap_binary,
    write_colmap_text,
)

from cameo_bench.__main__ import main
from cameo_bench.data.scene_format import read_dataset_index, read_scene, scene_dir

W, H = 96, 72
NAMES = ["image10.png", "image2.png", "image1.png", "image3.png"]  # natural order: 1, 2, 3, 10
NATURAL = ["image1.png", "image2.png", "image3.png", "image10.png"]
WRITERS = {"txt": write_colmap_text, "bin": write_colmap_binary}


def convert(src, out, *extra):
    assert main(["data", "convert", "--format", "colmap", str(src), str(out), *extra]) == 0
    return read_dataset_index(out)


def pinhole_capture(seed=0):
    cameras = {1: ("PINHOLE", W, H, [70.0, 68.5, 47.3, 36.9]), 2: ("SIMPLE_PINHOLE", W, H, [66.0, W / 2, H / 2])}
    return make_capture(NAMES, cameras, [1, 2, 1, 2], seed=seed)


def colmap_K(model, params):
    fx, fy, cx, cy = colmap_focal_centre(model, params)
    return np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1.0]])


def write_images(folder, cap, blobs=False, rng=None):
    """Random images, or blob images: a blob at the ideal projection of the first points seen."""
    rng = rng or np.random.default_rng(0)
    blob_ids = {}
    for im in cap.images:
        model, w, h, params = cap.cameras[im["camera_id"]]
        if not blobs:
            save_rgb(folder / im["name"], rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            continue
        w2c = im["w2c"]
        Xc = cap.xyz @ w2c[:3, :3].T + w2c[:3, 3]
        xn = Xc[:, :2] / Xc[:, 2:3]
        fx, fy, cx, cy = colmap_focal_centre(model, params)
        ideal = np.stack([fx * xn[:, 0] + cx, fy * xn[:, 1] + cy], 1)  # ideal COLMAP pixel
        chosen = []  # outer points first, where distortion moves them most, 12 px inside the image
        margin = np.minimum(np.minimum(ideal[:, 0], w - ideal[:, 0]), np.minimum(ideal[:, 1], h - ideal[:, 1]))
        for p in np.argsort(margin):
            if margin[p] > 12 and Xc[p, 2] > 0 and all(np.linalg.norm(ideal[p] - ideal[q]) > 16 for q in chosen):
                chosen.append(p)
            if len(chosen) == 5:
                break
        blob_ids[im["name"]] = chosen
        save_rgb(folder / im["name"], render_blobs(model, params, w, h, xn[chosen], sigma_px=1.6))
    return blob_ids


def frame_tracks(scene, cap):
    """{image name: (stored point ids, stored uv)} in the stored (natural) order."""
    return {name: scene.tracks.frames[n] for n, name in enumerate(scene.meta["images"])}


@pytest.mark.parametrize("kind", ["txt", "bin"])
def test_colmap_pinhole_model_round_trips_with_tracks(tmp_path, kind):
    cap = pinhole_capture()
    WRITERS[kind](tmp_path / "src" / "sparse" / "0", cap)
    write_images(tmp_path / "src" / "images", cap)
    index = convert(tmp_path / "src", tmp_path / "out")
    assert index["splits"] == {"train": ["src"]}
    scene = read_scene(scene_dir(tmp_path / "out", "src"))
    assert scene.meta["images"] == NATURAL and scene.meta["model_format"] == kind
    by_name = {im["name"]: im for im in cap.images}
    for n, name in enumerate(NATURAL):
        im = by_name[name]
        model, _, _, params = cap.cameras[im["camera_id"]]
        K = colmap_K(model, params)
        K[:2, 2] -= 0.5  # COLMAP's pixel centres sit at +0.5
        np.testing.assert_allclose(scene.K[n], K, atol=1e-5)
        np.testing.assert_allclose(scene.c2w[n], cap.c2w[name], atol=1e-5)
        source = cv2.imread(str(tmp_path / "src" / "images" / name))[..., ::-1]
        np.testing.assert_array_equal(scene.images[n], source)  # copied as is
    # tracks: the 3D points and, per frame, the triangulated observations shifted by -0.5
    np.testing.assert_array_equal(scene.tracks.ids, cap.point_ids)
    np.testing.assert_allclose(scene.tracks.xyz, cap.xyz, rtol=1e-6, atol=1e-6)
    xyz = dict(zip(cap.point_ids.tolist(), cap.xyz))
    for n, (name, (ids, uv)) in enumerate(frame_tracks(scene, cap).items()):
        im = by_name[name]
        keep = im["point_ids"] >= 0
        want = dict(zip(im["point_ids"][keep].tolist(), im["xy"][keep] - 0.5))
        assert sorted(ids.tolist()) == sorted(want)
        np.testing.assert_allclose(uv, np.stack([want[i] for i in ids.tolist()]), atol=1e-4)
        proj = opencv_project(scene.K[n], scene.c2w[n], np.stack([xyz[i] for i in ids.tolist()]))
        assert np.abs(proj - uv).max() < 1e-3
    assert scene.cameras.has_tracks


def test_colmap_principal_point_convention(tmp_path):
    """COLMAP's image centre (W/2, H/2) is the centre between the two middle pixels, our (W-1)/2: a
    blob rendered at COLMAP's centre lands there in the stored image, and K says the same."""
    cap = make_capture(["a.png", "b.png"], {1: ("SIMPLE_PINHOLE", W, H, [60.0, W / 2, H / 2])}, [1, 1])
    write_colmap_text(tmp_path / "s" / "sparse" / "0", cap)
    for im in cap.images:
        save_rgb(tmp_path / "s" / "images" / im["name"],
                 render_blobs("SIMPLE_PINHOLE", [60.0, W / 2, H / 2], W, H, np.zeros((1, 2)), 1.6))
    convert(tmp_path / "s", tmp_path / "out")
    scene = read_scene(scene_dir(tmp_path / "out", "s"))
    np.testing.assert_allclose(scene.K[0][:2, 2], [(W - 1) / 2, (H - 1) / 2], atol=1e-9)
    centroid = blob_centroid(scene.images[0][..., 0], [(W - 1) / 2, (H - 1) / 2])
    np.testing.assert_allclose(centroid, [(W - 1) / 2, (H - 1) / 2], atol=0.02)


DISTORTED = {
    "SIMPLE_RADIAL": [70.0, 48.2, 35.6, -0.15],
    "RADIAL": [70.0, 47.5, 36.4, -0.12, 0.03],
    "OPENCV": [72.0, 70.0, 48.4, 36.1, -0.1, 0.02, 0.002, -0.003],
}


@pytest.mark.parametrize("model", sorted(DISTORTED))
def test_colmap_distorted_cameras_are_undistorted(tmp_path, model):
    params = DISTORTED[model]
    cap = make_capture(["f1.png", "f2.png", "f3.png"], {1: (model, W, H, params)}, [1, 1, 1], num_points=300)
    write_colmap_binary(tmp_path / "src" / "sparse" / "0", cap)
    blob_ids = write_images(tmp_path / "src" / "images", cap, blobs=True)
    convert(tmp_path / "src", tmp_path / "out")
    scene = read_scene(scene_dir(tmp_path / "out", "src"))
    assert scene.meta["undistorted"] and scene.meta["camera_models"] == [model]

    # the documented choice of the new K: OpenCV's optimal pinhole camera, alpha 0, same size
    K = colmap_K(model, params)
    K[:2, 2] -= 0.5
    dist = {"SIMPLE_RADIAL": lambda: [params[3], 0, 0, 0], "RADIAL": lambda: [params[3], params[4], 0, 0],
            "OPENCV": lambda: params[4:]}[model]()
    K_new, _ = cv2.getOptimalNewCameraMatrix(K, np.array(dist), (W, H), 0, (W, H))
    xyz = dict(zip(cap.point_ids.tolist(), cap.xyz))
    track_err, blob_err = [], []
    for n, name in enumerate(scene.meta["images"]):
        np.testing.assert_allclose(scene.K[n], K_new, atol=1e-5)
        np.testing.assert_allclose(scene.c2w[n], cap.c2w[name], atol=1e-5)
        # tracks: the undistorted observation is the pinhole projection with the stored camera
        ids, uv = scene.tracks.frames[n]
        observed = sum(1 for p in next(im for im in cap.images if im["name"] == name)["point_ids"] if p >= 0)
        assert observed * 0.8 <= len(ids) <= observed  # a few fall off the undistorted image
        proj = opencv_project(scene.K[n], scene.c2w[n], np.stack([xyz[i] for i in ids.tolist()]))
        track_err.append(np.abs(proj - uv).max())
        # images: each blob sits where the stored camera projects its 3D point
        for p in blob_ids[name]:
            want = opencv_project(scene.K[n], scene.c2w[n], cap.xyz[p][None])[0]
            blob_err.append(np.linalg.norm(blob_centroid(scene.images[n][..., 0], want) - want))
    print(f"{model}: max track reprojection error {max(track_err):.2e} px, blob centroid error "
          f"max {max(blob_err):.3f} px, mean {np.mean(blob_err):.3f} px")
    assert max(track_err) < 1e-3
    assert max(blob_err) < 0.1


def test_colmap_images_at_the_root_or_given_folder(tmp_path):
    cap = pinhole_capture()
    write_colmap_binary(tmp_path / "root", cap)  # model files in the scene folder itself
    write_images(tmp_path / "root", cap)  # and the images next to them
    convert(tmp_path / "root", tmp_path / "out1")
    assert read_scene(scene_dir(tmp_path / "out1", "root")).meta["images"] == NATURAL

    write_colmap_text(tmp_path / "elsewhere" / "sparse", cap)
    write_images(tmp_path / "pictures", cap)
    assert main(["data", "convert", "--format", "colmap", str(tmp_path / "elsewhere"), str(tmp_path / "out2")]) == 2
    convert(tmp_path / "elsewhere", tmp_path / "out2", "--images", str(tmp_path / "pictures"))
    assert read_scene(scene_dir(tmp_path / "out2", "elsewhere")).meta["images"] == NATURAL


def test_colmap_downscaled_copy_rescales_K_and_tracks(tmp_path):
    cap = pinhole_capture()
    write_colmap_text(tmp_path / "s" / "sparse" / "0", cap)
    for im in cap.images:
        save_rgb(tmp_path / "s" / "images_2" / im["name"], np.zeros((H // 2, W // 2, 3), np.uint8))
    convert(tmp_path / "s", tmp_path / "out", "--downscale", "2")
    scene = read_scene(scene_dir(tmp_path / "out", "s"))
    xyz = dict(zip(cap.point_ids.tolist(), cap.xyz))
    for n, name in enumerate(NATURAL):
        im = next(i for i in cap.images if i["name"] == name)
        model, _, _, params = cap.cameras[im["camera_id"]]
        fx, fy, cx, cy = colmap_focal_centre(model, params)
        # half-size image: COLMAP's corner-origin coordinates simply halve
        want = np.array([[fx / 2, 0, cx / 2 - 0.5], [0, fy / 2, cy / 2 - 0.5], [0, 0, 1]])
        np.testing.assert_allclose(scene.K[n], want, atol=1e-9)
        ids, uv = scene.tracks.frames[n]
        proj = opencv_project(scene.K[n], scene.c2w[n], np.stack([xyz[i] for i in ids.tolist()]))
        assert np.abs(proj - uv).max() < 1e-3


def test_colmap_failures_are_one_line_exit_2_nothing_written(tmp_path, capsys):
    cap = pinhole_capture()
    write_colmap_binary(tmp_path / "s" / "sparse" / "0", cap)
    write_images(tmp_path / "s" / "images", cap)
    images_bin = tmp_path / "s" / "sparse" / "0" / "images.bin"
    images_bin.write_bytes(images_bin.read_bytes()[:200])
    out = tmp_path / "out"
    assert main(["data", "convert", "--format", "colmap", str(tmp_path / "s"), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(images_bin) in err and "truncated" in err and "points2D" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["s"]

    cap.cameras[1] = ("OPENCV_FISHEYE", W, H, [70.0, 70.0, 48.0, 36.0, 0.1, 0, 0, 0])
    write_colmap_text(tmp_path / "f" / "sparse" / "0", cap)
    write_images(tmp_path / "f" / "images", cap)
    assert main(["data", "convert", "--format", "colmap", str(tmp_path / "f"), str(out)]) == 2
    err = capsys.readouterr().err
    assert "cameras.txt:3: camera 1 uses model OPENCV_FISHEYE, which is not supported" in err
    assert not out.exists()
