"""`cameo-bench data check` and the pre-training fast path: every bad file named, a summary of what
the data holds, exit codes; damage is made by hand (truncated files, garbage bytes, normalised
intrinsics, a track off its image) on datasets written by the scene-folder writer."""
from __future__ import annotations

import json

import numpy as np
import pytest
from converter_fixtures import look_at

from cameo_bench.__main__ import main
from cameo_bench.config.spec import DataSpec
from cameo_bench.data.check import check_camera, check_dataset, check_frames
from cameo_bench.data.loading import build_datasets
from cameo_bench.data.scene_format import DatasetWriter, SceneFolderError, SparseTracks, read_cameras, scene_dir

H, W = 12, 16


def K_px(f=14.0):
    return np.array([[f, 0, (W - 1) / 2], [0, f, (H - 1) / 2], [0, 0, 1]])


def write(root, scenes, tracks=False, jpg=False, tmp=None):
    """scenes: id -> (split, frames). Frames are png arrays, or jpg files when `jpg`."""
    rng = np.random.default_rng(0)
    with DatasetWriter(root) as writer:
        for scene_id, (split, n) in scenes.items():
            images = rng.integers(0, 256, (n, H, W, 3), dtype=np.uint8)
            if jpg:
                import cv2
                paths = []
                for i, im in enumerate(images):
                    paths.append(tmp / f"{scene_id}_{i}.jpg")
                    cv2.imwrite(str(paths[-1]), im)
                images = paths
            c2w = np.stack([look_at((3.0, 0.2 * i, 1.0)) for i in range(n)])
            t = None
            if tracks:
                ids = np.arange(5, dtype=np.int64) * 7
                t = SparseTracks(ids, rng.uniform(-1, 1, (5, 3)),
                                 [(ids[:3], rng.uniform(0, [W - 1, H - 1], (3, 2))) for _ in range(n)])
            writer.add(scene_id, split, images, np.stack([K_px()] * n), c2w, depth=np.ones((n, H, W)), tracks=t)
    return root


def test_check_summary_of_a_good_dataset(tmp_path, capsys):
    write(tmp_path / "ds", {"a": ("train", 4), "b": ("train", 3), "c": ("test", 5)}, tracks=True)
    assert main(["data", "check", str(tmp_path / "ds")]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path / 'ds'}: 3 scenes, 12 frames" in out
    assert "split train: 2 scenes, 7 frames" in out and "split test: 1 scenes, 5 frames" in out
    assert "resolution (HxW): 12x16 (12 frames)" in out
    assert "depth: 3/3 scenes" in out and "point maps: none" in out
    assert "tracks: 3/3 scenes (15 points, 36 observations)" in out
    assert out.strip().endswith("ok")


def test_check_names_every_bad_file(tmp_path, capsys):
    root = write(tmp_path / "ds", {"a": ("train", 4), "b": ("test", 3)}, tracks=True)
    a, b = scene_dir(root, "a"), scene_dir(root, "b")
    png = a / "images" / "000001.png"
    png.write_bytes(png.read_bytes()[:-40])  # truncated
    (a / "images" / "000002.png").write_bytes(b"not an image at all")
    cams = json.loads((b / "cameras.json").read_text())
    cams["frames"][2]["K"] = [[0.5, 0, 0.5], [0, 0.6, 0.5], [0, 0, 1]]  # normalised intrinsics
    (b / "cameras.json").write_text(json.dumps(cams))
    np.savez(b / "tracks" / "000001.npz", point_ids=np.array([0, 7]), uv=np.array([[3.0, 4.0], [40.0, 2.0]]))
    np.save(b / "depth" / "000000.npy", np.ones((H, W + 1), np.float16))
    assert main(["data", "check", str(root)]) == 1
    bad = [line for line in capsys.readouterr().out.splitlines() if line.startswith("BAD ")]
    text = "\n".join(bad)
    assert f"BAD {png}: cannot decode image" in text
    assert f"BAD {a / 'images' / '000002.png'}: cannot decode image" in text
    assert f"{b / 'cameras.json'}: frames[2] (000002).K: horizontal field of view" in text
    assert f"{b / 'tracks' / '000001.npz'}: 1 observations lie off the 12x16 image" in text
    assert f"{b / 'depth' / '000000.npy'}: depth must be a float array of shape (12, 16)" in text
    assert len(bad) == 5


def test_check_warns_about_split_overlap_and_a_missing_scene_is_bad(tmp_path, capsys):
    root = write(tmp_path / "ds", {"a": ("train", 3), "b": ("test", 3)})
    index = json.loads((root / "dataset.json").read_text())
    index["splits"]["test"] += ["a", "gone"]
    (root / "dataset.json").write_text(json.dumps(index))
    assert main(["data", "check", str(root)]) == 1
    out = capsys.readouterr().out
    assert "warning: " in out and "scene 'a' is in splits 'train' and 'test'" in out
    assert f"BAD {root / 'scenes' / 'gone' / 'cameras.json'}: file does not exist" in out


def test_fast_path_reads_headers_and_end_markers(tmp_path):
    root = write(tmp_path / "ds", {"a": ("train", 3)}, jpg=True, tmp=tmp_path)
    cams = read_cameras(scene_dir(root, "a"))
    check_frames([cams])  # a good scene passes
    jpg = cams.image_paths[1]
    jpg.write_bytes(jpg.read_bytes()[:-10])  # truncated: header fine, no end marker
    with pytest.raises(SceneFolderError, match=r"1 bad files in the training data") as e:
        check_frames([cams, cams])  # the same scene twice (train and test of a frame split) counts once
    assert f"{jpg}: truncated JPEG (no end-of-image marker)" in str(e.value)
    report = check_dataset(root, decode=False)
    assert [p for p in report.problems if str(jpg) in p]


def test_training_names_a_corrupt_frame_before_step_0(tmp_path):
    root = write(tmp_path / "ds", {"a": ("train", 4), "b": ("test", 4)})
    png = scene_dir(root, "b") / "images" / "000003.png"
    png.write_bytes(png.read_bytes()[:-30])
    with pytest.raises(SceneFolderError, match=f"{png}: truncated PNG"):
        build_datasets(DataSpec(kind="folder", root=str(root), num_views=2, image_size=(H, W), batch_size=1))


@pytest.mark.parametrize("K, hw, problem", [
    ([[14, 0, 7.5], [0, 14, 5.5], [0, 0, 1]], (12, 16), None),
    ([[14, 0, 30.0], [0, 14, 5.5], [0, 0, 1]], (12, 16), "principal point (30, 5.5) is off the 12x16 image"),
    ([[0.5, 0, 7.5], [0, 0.5, 5.5], [0, 0, 1]], (12, 16), "horizontal field of view 172.8 deg"),
    ([[14, 0, 7.5], [0, 40, 5.5], [0, 0, 1]], (12, 16), "fy / fx = 2.857 is outside [0.5, 2.0]"),
])
def test_camera_sanity(K, hw, problem):
    problems = check_camera(np.array(K, dtype=float), hw, "cam")
    assert (problems == []) if problem is None else (problem in problems[0] and len(problems) == 1)
