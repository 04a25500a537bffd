"""The "your own data" flow of the README, end to end through the command line, on captures the test
writes in each format's own layout: a COLMAP reconstruction straight out of COLMAP (binary model,
SIMPLE_RADIAL camera), a nerfstudio transforms.json capture and a pixelSplat RE10K chunk are
converted and checked; a micro model trains on the one-scene COLMAP capture with `sfm_tracks` and a
frame-level hold-out; the run is evaluated on a pixelSplat-format index over the RE10K scene with
named conventions, and its eval.json states them, holds no NaN, and scores attention against tracks
on the frame-split held-out set."""
from __future__ import annotations

import json
import math
import pathlib

import cv2
import numpy as np
import pytest
import torch
from converter_fixtures import look_at, make_capture, save_rgb, write_colmap_binary

from cameo_bench.__main__ import main
from cameo_bench.tracking import keys

REPO = pathlib.Path(__file__).resolve().parents[1]
H, W = 48, 64


def write_colmap_capture(src: pathlib.Path) -> None:
    """12 photos, one SIMPLE_RADIAL camera (COLMAP's default for a phone), binary model in sparse/0."""
    names = [f"IMG_{i}.png" for i in range(1, 13)]
    cap = make_capture(names, {1: ("SIMPLE_RADIAL", W, H, [60.0, W / 2, H / 2, 0.02])}, [1] * 12, num_points=400)
    write_colmap_binary(src / "sparse" / "0", cap)
    rng = np.random.default_rng(0)
    texture = cv2.resize(rng.integers(0, 256, (H // 4, W // 4, 3), dtype=np.uint8), (W, H), interpolation=cv2.INTER_CUBIC)
    for n, name in enumerate(names):
        save_rgb(src / "images" / name, np.roll(texture, 2 * n, axis=1))


def write_nerfstudio_capture(src: pathlib.Path) -> None:
    """transforms.json with shared intrinsics and OpenGL camera-to-world matrices (nerfstudio's layout)."""
    frames = []
    for i in range(4):
        c2w_gl = look_at((2.0, 0.3 * i, 1.0)) @ np.diag([1.0, -1.0, -1.0, 1.0])  # OpenCV -> OpenGL axes
        save_rgb(src / "images" / f"frame_{i + 1:05d}.png", np.full((H, W, 3), 30 * i, np.uint8))
        frames.append({"file_path": f"images/frame_{i + 1:05d}.png", "transform_matrix": c2w_gl.tolist()})
    (src / "transforms.json").write_text(json.dumps(
        {"w": W, "h": H, "fl_x": 50.0, "fl_y": 50.0, "cx": W / 2, "cy": H / 2, "camera_model": "OPENCV", "frames": frames}))


def write_re10k_chunk(path: pathlib.Path, key: str, num_frames: int = 8) -> None:
    """A pixelSplat chunk: a list of dicts with key, url, timestamps, cameras [T, 18] (normalised fx fy
    cx cy, two unused, 3x4 world-to-camera) and JPEG bytes."""
    rng = np.random.default_rng(1)
    cams, images = [], []
    for t in range(num_frames):
        w2c = np.linalg.inv(look_at((2.0 + 0.05 * t, 0.5, 1.0)))
        cams.append(np.concatenate([[0.9, 1.6, 0.5, 0.5, 0.0, 0.0], w2c[:3].reshape(-1)]))
        ok, jpg = cv2.imencode(".jpg", rng.integers(0, 256, (36, 64, 3), dtype=np.uint8))
        images.append(torch.from_numpy(jpg.reshape(-1).copy()))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save([{"key": key, "url": f"https://www.youtube.com/watch?v={key}",
                 "timestamps": torch.arange(num_frames, dtype=torch.int64) * 33366,
                 "cameras": torch.tensor(np.stack(cams), dtype=torch.float32), "images": images}], path)


@pytest.mark.slow  # ~25 s on 2 cores: three conversions, a training run, two evaluations
def test_your_own_data_flow(tmp_path, capsys):
    # convert: COLMAP (binary, SIMPLE_RADIAL), nerfstudio, a pixelSplat RE10K chunk; then check each
    write_colmap_capture(tmp_path / "phone")
    write_nerfstudio_capture(tmp_path / "fox")
    key = "5aca87f95a9412c6"
    write_re10k_chunk(tmp_path / "re10k" / "test" / "000000.torch", key)
    for fmt, src, out in [("colmap", "phone", "phone_scenes"), ("nerfstudio", "fox", "fox_scenes"),
                          ("re10k_chunks", "re10k", "re10k_scenes")]:
        assert main(["data", "convert", "--format", fmt, str(tmp_path / src), str(tmp_path / out)]) == 0, fmt
        assert main(["data", "check", str(tmp_path / out)]) == 0, fmt

    # train a micro model on the one-scene capture: SfM tracks, every 4th frame held out
    bindings = [f"run_experiment.output_dir = '{tmp_path / 'runs'}'", "run_experiment.name = 'phone'",
                "data.kind = 'folder'", f"data.root = '{tmp_path / 'phone_scenes'}'", "data.image_size = (24, 32)",
                "data.split = 'frame'", "data.test_every = 4", "data.samples_per_scene = 8", "data.num_views = 3",
                "cameo.source = 'sfm_tracks'", "cameo.weight = 0.1", "train.steps = 2", "eval.every = 0",
                "eval.num_scenes = 2"]
    args = ["train", str(REPO / "gin/experiments/smoke.gin"), "--no-progress", "--no-tracking"]
    assert main(args + [a for b in bindings for a in ("--gin_param", b)]) == 0
    run_dir = tmp_path / "runs" / "phone"
    assert "nan" not in (run_dir / keys.METRICS_FILE).read_text().lower()
    params = json.loads((run_dir / keys.PARAMS_FILE).read_text())
    assert params[keys.eval_convention("ssim")] == "torchmetrics"  # the defaults, named

    # evaluate the run on its frame hold-out: attention scored against the SfM tracks
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--output", str(tmp_path / "holdout.json")]) == 0
    holdout = json.loads((tmp_path / "holdout.json").read_text())
    tracks_pck = keys.attn(keys.SUPERVISED_LAYER, keys.attn_truth(keys.TRUTH_TRACKS, keys.PCK1))
    assert 0 <= holdout[tracks_pck] <= 1 and keys.CONSISTENCY in holdout[keys.EVAL_JSON_NOT_COMPUTED]

    # evaluate on a pixelSplat-format index over the RE10K scene, with pixelSplat's conventions
    index = tmp_path / "evaluation_index_re10k.json"
    index.write_text(json.dumps({key: {"context": [0, 7], "target": [2, 4, 6]}, "e74ceac9043aa1b8": None}))
    assert main(["eval", str(run_dir), "--output", str(tmp_path / "index.json"),
                 "--gin_param", f"eval.index = '{index}'", "--gin_param", f"eval.index_root = '{tmp_path / 're10k_scenes'}'",
                 "--gin_param", "eval.conventions = 'pixelsplat'", "--gin_param", "eval.attention = False"]) == 0
    result = json.loads((tmp_path / "index.json").read_text())
    conventions = result[keys.EVAL_JSON_CONVENTIONS]
    assert (conventions["psnr"], conventions["ssim"], conventions["lpips"]) == ("per_image", "gaussian11", "vgg")
    assert conventions["index"] == str(index) and "center_crop" in conventions["preprocess"]
    assert result[keys.eval_by_bin(keys.COUNT, "0-30")] == 3  # one entry, three targets
    assert not [k for k, v in result.items() if isinstance(v, float) and not math.isfinite(v)]
