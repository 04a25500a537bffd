"""RealEstate10K pixelSplat-chunk converter on `.torch` chunks written here with torch.save in
pixelSplat's layout (src/dataset/dataset_re10k.py): a list of dicts with `key`, `url`,
`timestamps` [T], `cameras` [T, 18] = fx fy cx cy (normalised by width / height), two unused
numbers, the 3x4 world-to-camera matrix row-major; `images`: T uint8 tensors of JPEG bytes. The
split is the chunk folder's name. pixelSplat's pixel i has the normalised coordinate (i + 0.5) / W."""
from __future__ import annotations

import cv2
import numpy as np
import torch
from converter_fixtures import look_at, opencv_project

from cameo_bench.__main__ import main
from cameo_bench.data.scene_format import read_dataset_index, read_scene, scene_dir

H, W = 36, 64  # RE10K's 360 x 640, scaled down


def clip(key, n, seed):
    rng = np.random.default_rng(seed)
    cams, images, c2ws = [], [], []
    for t in range(n):
        c2w = look_at((2.0 + 0.1 * t, 0.5, 1.0))
        fx, fy, cx, cy = 0.9 + 0.01 * t, 1.6, 0.5 + 0.01 * t, 0.48  # normalised
        cams.append(np.concatenate([[fx, fy, cx, cy, 0.0, 0.0], np.linalg.inv(c2w)[:3].reshape(-1)]))
        ok, jpg = cv2.imencode(".jpg", rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
        images.append(torch.from_numpy(jpg.reshape(-1).copy()))
        c2ws.append(c2w)
    example = {"key": key, "url": f"https://www.youtube.com/watch?v={key}",
               "timestamps": torch.arange(n, dtype=torch.int64) * 33366,
               "cameras": torch.tensor(np.stack(cams), dtype=torch.float32), "images": images}
    return example, np.stack(c2ws)


def pixelsplat_pixel(camera, X):
    """pixelSplat's projection: w2c, normalised K, then pixel index = normalised * size - 0.5."""
    c = camera.double().numpy()
    Xc = c[6:].reshape(3, 4) @ np.append(X, 1.0)
    x, y = c[0] * Xc[0] / Xc[2] + c[2], c[1] * Xc[1] / Xc[2] + c[3]
    return np.array([x * W - 0.5, y * H - 0.5])


def test_re10k_chunks(tmp_path):
    a, c2w_a = clip("5aca87f95a9412c6", 4, 0)
    b, _ = clip("00aa11bb22cc33dd", 3, 1)
    c, _ = clip("ffee00112233aabb", 5, 2)
    (tmp_path / "re10k" / "train").mkdir(parents=True)
    (tmp_path / "re10k" / "test").mkdir()
    torch.save([a, b], tmp_path / "re10k" / "train" / "000000.torch")
    torch.save([c], tmp_path / "re10k" / "test" / "000000.torch")
    assert main(["data", "convert", "--format", "re10k_chunks", str(tmp_path / "re10k"), str(tmp_path / "out")]) == 0
    assert read_dataset_index(tmp_path / "out")["splits"] == {
        "test": ["ffee00112233aabb"], "train": ["5aca87f95a9412c6", "00aa11bb22cc33dd"]}
    scene = read_scene(scene_dir(tmp_path / "out", "5aca87f95a9412c6"))
    cams = a["cameras"].double().numpy()
    for t in range(4):
        fx, fy, cx, cy = cams[t, :4]
        np.testing.assert_allclose(scene.K[t], [[fx * W, 0, cx * W - 0.5], [0, fy * H, cy * H - 0.5], [0, 0, 1]],
                                   atol=1e-5)
        np.testing.assert_allclose(scene.c2w[t], c2w_a[t], atol=1e-5)  # float32 storage
        for X in np.random.default_rng(t).uniform(-0.5, 0.5, (4, 3)):
            np.testing.assert_allclose(opencv_project(scene.K[t], scene.c2w[t], X[None])[0],
                                       pixelsplat_pixel(a["cameras"][t], X), atol=1e-4)
        stored = scene.cameras.image_paths[t]
        assert stored.suffix == ".jpg" and stored.read_bytes() == a["images"][t].numpy().tobytes()  # as is
    assert scene.meta["url"].endswith("5aca87f95a9412c6") and scene.meta["timestamps"][1] == 33366


def test_re10k_chunk_errors_name_the_chunk_clip_and_field(tmp_path, capsys):
    a, _ = clip("k1", 3, 0)
    a["cameras"] = a["cameras"][:, :17]
    (tmp_path / "c").mkdir()
    torch.save([a], tmp_path / "c" / "000003.torch")
    assert main(["data", "convert", "--format", "re10k_chunks", str(tmp_path / "c"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'c' / '000003.torch'}: [0] key 'k1': field 'cameras' must be [T, 18], got [3, 17]" in err
    b, _ = clip("k2", 3, 0)
    b["images"][1] = torch.from_numpy(b["images"][1].numpy()[:50].copy())  # truncated JPEG
    torch.save([b], tmp_path / "c" / "000003.torch")
    assert main(["data", "convert", "--format", "re10k_chunks", str(tmp_path / "c"), str(tmp_path / "out")]) == 2
    assert f"000003.torch: [0] key 'k2': images[1]" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
