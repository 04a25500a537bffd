"""RealEstate10K / ACID camera files -> scene folders.

Expected layout (the camera txt files are the official release; frames must be extracted from the
YouTube videos by the user, one image per camera line, named by its timestamp)::

    SRC/<clip>.txt                      line 1: video URL; then one line per frame
    SRC/<clip>/<timestamp>.png|jpg      the frame of that line
    # or, to keep the official splits:
    SRC/train/<clip>.txt, SRC/train/<clip>/<timestamp>.png, SRC/test/...

A frame line holds 19 numbers: `timestamp fx fy cx cy k1 k2` then the 3x4 world-to-camera matrix
row-major. Intrinsics are normalised (fx, cx by the image width; fy, cy by its height), so K is
built from the size of the decoded frame (`normalised_K`). Poses already use OpenCV axes;
c2w = inverse(w2c). Scale comes from SLAM: not metric.

Pixel convention: the release does not define it; we follow pixelSplat, whose normalised image
coordinates put pixel i's centre at (i + 0.5) / W (`sample_image_grid` in its
src/geometry/projection.py), so cx = 0.5 is the centre of the image and, with our centre of the
top-left pixel at (0, 0): K = [[fx W, 0, cx W - 0.5], [0, fy H, cy H - 0.5], [0, 0, 1]].
(Before this was pinned the converter wrote cx W, half a pixel off.)
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cameo_bench.data.converters.base import (
    ConvertedScene,
    ConvertOptions,
    find_image,
    image_hw,
    register_converter,
    rigid_from_w2c,
)
from cameo_bench.data.scene_format import SceneFolderError, validate_c2w

NUMBERS_PER_LINE = 19


def normalised_K(fx: float, fy: float, cx: float, cy: float, hw: tuple[int, int]) -> np.ndarray:
    """Pixel K [3, 3] (centre of the top-left pixel at (0, 0)) from RE10K / pixelSplat normalised
    intrinsics, whose pixel i has its centre at (i + 0.5) / W."""
    H, W = hw
    return np.array([[fx * W, 0, cx * W - 0.5], [0, fy * H, cy * H - 0.5], [0, 0, 1.0]])


def _clip_files(src: Path) -> list[tuple[str | None, Path]]:
    if src.is_file():
        return [(None, src)]
    found = [(None, p) for p in sorted(src.glob("*.txt"))]
    for sub in sorted(p for p in src.iterdir() if p.is_dir()):
        found += [(sub.name, p) for p in sorted(sub.glob("*.txt"))]
    if not found:
        raise SceneFolderError(f"{src}: no RealEstate10K camera files (*.txt) here or in its split folders")
    return found


def parse_camera_file(path: Path) -> tuple[str, list[str], np.ndarray, np.ndarray]:
    """-> (url, timestamps, normalised intrinsics [F, 4] (fx, fy, cx, cy), w2c [F, 4, 4])."""
    lines = path.read_text().splitlines()
    if not lines:
        raise SceneFolderError(f"{path}: empty camera file")
    url, timestamps, intr, w2c = lines[0].strip(), [], [], []
    for lineno, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != NUMBERS_PER_LINE:
            raise SceneFolderError(f"{path}:{lineno}: expected {NUMBERS_PER_LINE} numbers "
                                   f"(timestamp fx fy cx cy k1 k2 + 3x4 w2c), got {len(fields)}")
        try:
            values = np.array([float(v) for v in fields[1:]])
        except ValueError as e:
            raise SceneFolderError(f"{path}:{lineno}: {e}") from None
        if not np.isfinite(values).all():
            raise SceneFolderError(f"{path}:{lineno}: non-finite camera values")
        fx, fy, cx, cy = values[:4]
        if fx <= 0 or fy <= 0:
            raise SceneFolderError(f"{path}:{lineno}: focal lengths must be positive, got fx={fx}, fy={fy}")
        M = np.eye(4)
        M[:3] = values[6:].reshape(3, 4)  # row-major 3x4
        validate_c2w(M, f"{path}:{lineno}: w2c")  # rigid either way round
        timestamps.append(fields[0])
        intr.append(values[:4])
        w2c.append(M)
    if not timestamps:
        raise SceneFolderError(f"{path}: no frame lines after the URL line")
    return url, timestamps, np.stack(intr), np.stack(w2c)


@register_converter("re10k")
def iter_scenes(src: Path, options: ConvertOptions) -> Iterator[ConvertedScene]:
    for split, txt in _clip_files(src):
        url, timestamps, intr, w2c = parse_camera_file(txt)
        frame_dir = txt.with_suffix("")
        images, Ks = [], []
        for ts, (fx, fy, cx, cy) in zip(timestamps, intr):
            image = find_image(frame_dir / ts)
            if image is None:
                raise SceneFolderError(f"{txt}: frame {ts} has no image {frame_dir / ts}.png|jpg")
            Ks.append(normalised_K(fx, fy, cx, cy, image_hw(image)))
            images.append(image)
        c2w = np.stack([rigid_from_w2c(M[:3, :3], M[:3, 3]) for M in w2c])
        yield ConvertedScene(
            scene_id=txt.stem, images=images, K=np.stack(Ks), c2w=c2w,
            names=[f"{i:06d}" for i in range(len(timestamps))],
            meta={"dataset": "realestate10k", "url": url, "timestamps": timestamps},
            split=split, source=str(txt),
        )
