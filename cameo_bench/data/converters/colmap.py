"""COLMAP text models -> scene folders (MVImgNet, ScanNet++ DSLR after undistortion, MipNeRF360, ...).

Expected layout, for SRC itself or for every folder below it that holds a model (scene id = its
path relative to SRC)::

    <scene>/images/<name>                         the image files named in images.txt
    <scene>/sparse/0/{cameras,images}.txt         or <scene>/sparse/ or <scene>/ itself
    <scene>/sparse/0/points3D.txt                 optional (only counted, into meta.json)

Binary models (*.bin) must first be converted: `colmap model_converter --input_path sparse/0
--output_path sparse/0 --output_type TXT`.

Conventions (colmap.github.io/format.html): images.txt stores the world-to-camera pose as a unit
quaternion QW QX QY QZ (Hamilton, scalar first) and TX TY TZ, OpenCV camera axes. Pixel
coordinates put the centre of the top-left pixel at (0.5, 0.5), ours at (0, 0): cx, cy - 0.5.
Supported camera models: SIMPLE_PINHOLE, PINHOLE, and the distortion models when all of their
distortion parameters are 0; anything else must be undistorted first (`colmap image_undistorter`).
Frames are ordered by image name (usually the capture order).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cameo_bench.data.converters import ConvertedScene, image_hw, register_converter, rigid_from_w2c
from cameo_bench.data.scene_format import SceneFolderError, validate_c2w

MODEL_DIRS = ("sparse/0", "sparse", ".")
# model -> (number of params, index of the distortion params). Focal/centre layout below.
CAMERA_MODELS = {
    "SIMPLE_PINHOLE": (3, slice(3, 3)),
    "PINHOLE": (4, slice(4, 4)),
    "SIMPLE_RADIAL": (4, slice(3, 4)),
    "RADIAL": (5, slice(3, 5)),
    "OPENCV": (8, slice(4, 8)),
    "FULL_OPENCV": (12, slice(4, 12)),
}


def _model_dir(scene: Path) -> Path | None:
    for rel in MODEL_DIRS:
        d = scene / rel
        if (d / "cameras.txt").is_file() and (d / "images.txt").is_file():
            return d
        if (d / "cameras.bin").is_file():
            raise SceneFolderError(f"{d}: binary COLMAP model; convert it to text first with `colmap "
                                   f"model_converter --input_path {d} --output_path {d} --output_type TXT`")
    return None


def _scenes(src: Path) -> list[tuple[str, Path, Path]]:
    """(scene id, scene folder, model folder) for SRC or every model below it."""
    model = _model_dir(src)
    if model is not None:
        return [(src.resolve().name, src, model)]
    found = []
    for dirpath, dirnames, _ in os.walk(src):
        dirnames.sort()
        here = Path(dirpath)
        if here == src:
            continue
        model = _model_dir(here)
        if model is not None:
            found.append((here.relative_to(src).as_posix(), here, model))
            dirnames[:] = []  # a scene's own sub-folders (sparse/, images/) are not scenes
    if not found:
        raise SceneFolderError(f"{src}: no COLMAP text model (cameras.txt + images.txt in "
                               f"{' or '.join(MODEL_DIRS)}) here or below")
    return found


def _data_lines(path: Path) -> Iterator[tuple[int, str]]:
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            yield lineno, line.strip()


def read_cameras_txt(path: Path) -> dict[int, tuple[str, int, int, np.ndarray]]:
    """camera id -> (model, width, height, K [3, 3] in COLMAP pixel coordinates)."""
    cameras = {}
    for lineno, line in _data_lines(path):
        fields = line.split()
        try:
            cam_id, model, width, height = int(fields[0]), fields[1], int(fields[2]), int(fields[3])
            params = np.array([float(v) for v in fields[4:]])
        except (IndexError, ValueError) as e:
            raise SceneFolderError(f"{path}:{lineno}: cannot parse camera line ({e})") from None
        if model not in CAMERA_MODELS:
            raise SceneFolderError(f"{path}:{lineno}: camera {cam_id} uses model {model}, which is not "
                                   f"supported ({sorted(CAMERA_MODELS)} without distortion); undistort the "
                                   "images first with `colmap image_undistorter`")
        count, distortion = CAMERA_MODELS[model]
        if len(params) != count:
            raise SceneFolderError(f"{path}:{lineno}: model {model} needs {count} params, got {len(params)}")
        if np.any(params[distortion] != 0):
            raise SceneFolderError(f"{path}:{lineno}: camera {cam_id} ({model}) has non-zero distortion "
                                   f"{params[distortion].tolist()}; undistort the images first with "
                                   "`colmap image_undistorter`")
        if model in ("SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL"):
            fx = fy = params[0]
            cx, cy = params[1], params[2]
        else:
            fx, fy, cx, cy = params[:4]
        cameras[cam_id] = (model, width, height, np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1.0]]))
    return cameras


def quaternion_to_matrix(q: np.ndarray) -> np.ndarray:
    """Unit quaternion (w, x, y, z), Hamilton convention -> rotation matrix."""
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def read_images_txt(path: Path) -> list[tuple[str, int, np.ndarray, int]]:
    """-> [(name, camera id, w2c [4, 4], line number)]. Each image takes two lines: the pose, then
    its 2D points (possibly empty), so blank lines cannot simply be skipped."""
    lines = path.read_text().splitlines()
    images, i = [], 0
    while i < len(lines):
        line = lines[i].strip()
        lineno = i + 1
        i += 1
        if not line or line.startswith("#"):
            continue
        i += 1  # POINTS2D line
        fields = line.split(maxsplit=9)
        try:
            q = np.array([float(v) for v in fields[1:5]])
            t = np.array([float(v) for v in fields[5:8]])
            cam_id, name = int(fields[8]), fields[9]
        except (IndexError, ValueError) as e:
            raise SceneFolderError(f"{path}:{lineno}: cannot parse image line ({e})") from None
        if not (np.isfinite(q).all() and np.isfinite(t).all()) or abs(np.linalg.norm(q) - 1) > 1e-3:
            raise SceneFolderError(f"{path}:{lineno}: pose of {name} is not a finite unit quaternion + "
                                   f"translation: q={q.tolist()}, t={t.tolist()}")
        w2c = np.eye(4)
        w2c[:3, :3], w2c[:3, 3] = quaternion_to_matrix(q), t
        validate_c2w(w2c, f"{path}:{lineno}: w2c")
        images.append((name, cam_id, w2c, lineno))
    if not images:
        raise SceneFolderError(f"{path}: no images")
    return images


def _count_points(path: Path) -> int | None:
    return sum(1 for _ in _data_lines(path)) if path.is_file() else None


@register_converter("colmap")
def iter_scenes(src: Path) -> Iterator[ConvertedScene]:
    for scene_id, scene, model in _scenes(src):
        cameras = read_cameras_txt(model / "cameras.txt")
        entries = sorted(read_images_txt(model / "images.txt"), key=lambda e: e[0])
        images, Ks, c2ws = [], [], []
        for name, cam_id, w2c, lineno in entries:
            where = f"{model / 'images.txt'}:{lineno}"
            if cam_id not in cameras:
                raise SceneFolderError(f"{where}: camera id {cam_id} is not in {model / 'cameras.txt'}")
            _, width, height, K = cameras[cam_id]
            image = scene / "images" / name
            if not image.is_file():
                raise SceneFolderError(f"{where}: image file {image} does not exist")
            if image_hw(image) != (height, width):
                raise SceneFolderError(f"{image}: size {image_hw(image)} (HxW) differs from camera {cam_id} "
                                       f"({height}x{width}) in {model / 'cameras.txt'}")
            K = K.copy()
            K[:2, 2] -= 0.5  # COLMAP pixel centres are at +0.5
            images.append(image)
            Ks.append(K)
            c2ws.append(rigid_from_w2c(w2c[:3, :3], w2c[:3, 3]))
        yield ConvertedScene(
            scene_id=scene_id, images=images, K=np.stack(Ks), c2w=np.stack(c2ws),
            names=[f"{i:06d}" for i in range(len(images))],
            meta={"dataset": "colmap", "images": [e[0] for e in entries],
                  "camera_models": sorted({cameras[e[1]][0] for e in entries}),
                  "num_points3d": _count_points(model / "points3D.txt")},
            source=str(model),
        )
