"""COLMAP sparse models, text and binary: cameras, images (pose + 2D observations) and points3D.

Read from COLMAP's documented layouts (colmap.github.io/format.html); all binary values are
little-endian:

    cameras.bin   uint64 count; per camera: int32 camera_id, int32 model_id, uint64 width,
                  uint64 height, float64 params[number of params of the model]
    images.bin    uint64 count; per image: int32 image_id, float64 qw qx qy qz, float64 tx ty tz,
                  int32 camera_id, name (bytes up to a NUL), uint64 num_points2D,
                  then per point: float64 x, float64 y, int64 point3D_id (-1: none)
    points3D.bin  uint64 count; per point: uint64 point3D_id, float64 x y z, uint8 r g b,
                  float64 error, uint64 track_length, then track_length x (int32 image_id,
                  int32 point2D_idx)

    cameras.txt   CAMERA_ID MODEL WIDTH HEIGHT PARAMS[]
    images.txt    two lines per image: IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME, then
                  POINTS2D[] as (X, Y, POINT3D_ID), possibly empty
    points3D.txt  POINT3D_ID X Y Z R G B ERROR TRACK[] as (IMAGE_ID, POINT2D_IDX)

Poses are world-to-camera, a Hamilton unit quaternion (scalar first) and a translation, OpenCV
camera axes. Pixel coordinates (params cx, cy and the 2D points) put the centre of the top-left
pixel at (0.5, 0.5). Everything is returned as stored; the converter changes conventions.
"""
from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cameo_bench.data.scene_format import SceneFolderError, validate_c2w

# model id -> (name, number of params), from COLMAP's src/colmap/sensor/models.h
CAMERA_MODELS = {
    0: ("SIMPLE_PINHOLE", 3), 1: ("PINHOLE", 4), 2: ("SIMPLE_RADIAL", 4), 3: ("RADIAL", 5),
    4: ("OPENCV", 8), 5: ("OPENCV_FISHEYE", 8), 6: ("FULL_OPENCV", 12), 7: ("FOV", 5),
    8: ("SIMPLE_RADIAL_FISHEYE", 4), 9: ("RADIAL_FISHEYE", 5), 10: ("THIN_PRISM_FISHEYE", 12),
    11: ("RAD_TAN_THIN_PRISM_FISHEYE", 16),
}
NUM_PARAMS = {name: count for name, count in CAMERA_MODELS.values()}
POINT2D = np.dtype([("x", "<f8"), ("y", "<f8"), ("id", "<i8")])


@dataclass
class Camera:
    id: int
    model: str
    width: int
    height: int
    params: np.ndarray  # as COLMAP stores them (cx, cy with the 0.5 pixel-centre offset)
    where: str  # file (and line) it came from


@dataclass
class Image:
    id: int
    name: str
    camera_id: int
    w2c: np.ndarray  # [4, 4]
    xy: np.ndarray  # [n, 2] observations, COLMAP pixel coordinates
    point3d_ids: np.ndarray  # [n] int64, -1 = not triangulated
    where: str


@dataclass
class Model:
    cameras: dict[int, Camera]
    images: list[Image]
    point_ids: np.ndarray | None  # [P] int64 (None: no points3D file)
    xyz: np.ndarray | None  # [P, 3]
    kind: str  # "bin" or "txt"
    folder: Path


def has_model(folder: Path) -> str | None:
    """'bin' or 'txt' if `folder` holds a COLMAP model (cameras + images), else None."""
    for kind in ("bin", "txt"):
        if (folder / f"cameras.{kind}").is_file() and (folder / f"images.{kind}").is_file():
            return kind
    return None


def read_model(folder: Path) -> Model:
    """Read the model in `folder` (binary if both are present: COLMAP's own choice)."""
    kind = has_model(folder)
    if kind is None:
        raise SceneFolderError(f"{folder}: no COLMAP model (cameras + images .bin or .txt)")
    if kind == "bin":
        cameras, images = read_cameras_bin(folder / "cameras.bin"), read_images_bin(folder / "images.bin")
        points = folder / "points3D.bin"
        ids, xyz = read_points3d_bin(points) if points.is_file() else (None, None)
    else:
        cameras, images = read_cameras_txt(folder / "cameras.txt"), read_images_txt(folder / "images.txt")
        points = folder / "points3D.txt"
        ids, xyz = read_points3d_txt(points) if points.is_file() else (None, None)
    if not images:
        raise SceneFolderError(f"{folder / f'images.{kind}'}: no images")
    return Model(cameras, images, ids, xyz, kind, folder)


def quaternion_to_matrix(q: np.ndarray) -> np.ndarray:
    """Unit quaternion (w, x, y, z), Hamilton convention -> rotation matrix."""
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def _pose(q, t, name: str, where: str) -> np.ndarray:
    q, t = np.asarray(q, dtype=np.float64), np.asarray(t, dtype=np.float64)
    if not (np.isfinite(q).all() and np.isfinite(t).all()) or abs(np.linalg.norm(q) - 1) > 1e-3:
        raise SceneFolderError(f"{where}: pose of {name} is not a finite unit quaternion + "
                               f"translation: q={q.tolist()}, t={t.tolist()}")
    w2c = np.eye(4)
    w2c[:3, :3], w2c[:3, 3] = quaternion_to_matrix(q), t
    validate_c2w(w2c, f"{where}: w2c")
    return w2c


def _check_camera(cam: Camera) -> Camera:
    if cam.model not in NUM_PARAMS:
        raise SceneFolderError(f"{cam.where}: camera {cam.id} has unknown model {cam.model!r}; "
                               f"COLMAP's models: {sorted(NUM_PARAMS)}")
    if len(cam.params) != NUM_PARAMS[cam.model]:
        raise SceneFolderError(f"{cam.where}: model {cam.model} needs {NUM_PARAMS[cam.model]} params, "
                               f"got {len(cam.params)}")
    if cam.width <= 0 or cam.height <= 0 or not np.isfinite(cam.params).all():
        raise SceneFolderError(f"{cam.where}: camera {cam.id} has size {cam.width}x{cam.height} and params "
                               f"{cam.params.tolist()}; need a positive size and finite params")
    return cam


# ----------------------------------------------------------------------------------------------
# Text


def _data_lines(path: Path) -> Iterator[tuple[int, str]]:
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            yield lineno, line.strip()


def read_cameras_txt(path: Path) -> dict[int, Camera]:
    cameras = {}
    for lineno, line in _data_lines(path):
        fields = line.split()
        try:
            cam = Camera(int(fields[0]), fields[1], int(fields[2]), int(fields[3]),
                         np.array([float(v) for v in fields[4:]]), f"{path}:{lineno}")
        except (IndexError, ValueError) as e:
            raise SceneFolderError(f"{path}:{lineno}: cannot parse camera line ({e})") from None
        cameras[cam.id] = _check_camera(cam)
    return cameras


def read_images_txt(path: Path) -> list[Image]:
    """Each image takes two lines, the pose and then its 2D points (possibly an empty line), so
    blank lines cannot simply be skipped."""
    lines = path.read_text().splitlines()
    images, i = [], 0
    while i < len(lines):
        line = lines[i].strip()
        lineno = i + 1
        i += 1
        if not line or line.startswith("#"):
            continue
        points_line = lines[i] if i < len(lines) else ""
        i += 1
        fields = line.split(maxsplit=9)
        where = f"{path}:{lineno}"
        try:
            image_id, cam_id, name = int(fields[0]), int(fields[8]), fields[9]
            q, t = [float(v) for v in fields[1:5]], [float(v) for v in fields[5:8]]
        except (IndexError, ValueError) as e:
            raise SceneFolderError(f"{where}: cannot parse image line ({e})") from None
        try:
            values = np.array(points_line.split(), dtype=np.float64).reshape(-1, 3)
        except ValueError:
            raise SceneFolderError(f"{path}:{lineno + 1}: field POINTS2D of {name} must be triples "
                                   "X Y POINT3D_ID") from None
        images.append(Image(image_id, name, cam_id, _pose(q, t, name, where), values[:, :2],
                            values[:, 2].astype(np.int64), where))
    return images


def read_points3d_txt(path: Path) -> tuple[np.ndarray, np.ndarray]:
    ids, xyz = [], []
    for lineno, line in _data_lines(path):
        fields = line.split()
        try:
            ids.append(int(fields[0]))
            xyz.append([float(v) for v in fields[1:4]])
        except (IndexError, ValueError) as e:
            raise SceneFolderError(f"{path}:{lineno}: cannot parse point line ({e})") from None
        if len(xyz[-1]) != 3:
            raise SceneFolderError(f"{path}:{lineno}: point {ids[-1]} needs X Y Z")
    return np.array(ids, dtype=np.int64), np.array(xyz, dtype=np.float64).reshape(-1, 3)


# ----------------------------------------------------------------------------------------------
# Binary


class _Reader:
    """Sequential little-endian reads that name the file, the record and the field when truncated."""

    def __init__(self, path: Path):
        self.path, self.data, self.pos = path, path.read_bytes(), 0

    def take(self, fmt: str, what: str) -> tuple:
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.data):
            raise SceneFolderError(f"{self.path}: truncated at byte {self.pos} while reading {what}")
        values = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += size
        return values

    def array(self, dtype: np.dtype, count: int, what: str) -> np.ndarray:
        size = dtype.itemsize * count
        if count < 0 or self.pos + size > len(self.data):
            raise SceneFolderError(f"{self.path}: truncated at byte {self.pos} while reading {what} "
                                   f"({count} entries)")
        out = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.pos)
        self.pos += size
        return out

    def string(self, what: str) -> str:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise SceneFolderError(f"{self.path}: truncated at byte {self.pos} while reading {what}")
        value = self.data[self.pos:end].decode("utf-8", errors="replace")
        self.pos = end + 1
        return value

    def done(self) -> None:
        if self.pos != len(self.data):
            raise SceneFolderError(f"{self.path}: {len(self.data) - self.pos} unexpected bytes after the last "
                                   "record (not a COLMAP binary model of this kind?)")


def read_cameras_bin(path: Path) -> dict[int, Camera]:
    r = _Reader(path)
    (count,) = r.take("Q", "the number of cameras")
    cameras = {}
    for n in range(count):
        cam_id, model_id, width, height = r.take("iiQQ", f"camera {n} (camera_id, model_id, width, height)")
        if model_id not in CAMERA_MODELS:
            raise SceneFolderError(f"{path}: camera {cam_id} has unknown model_id {model_id}; COLMAP's: "
                                   f"{ {k: v[0] for k, v in CAMERA_MODELS.items()} }")
        model, num = CAMERA_MODELS[model_id]
        params = np.array(r.take("d" * num, f"camera {cam_id} params ({model}: {num})"))
        cameras[cam_id] = _check_camera(Camera(cam_id, model, width, height, params, f"{path}: camera {cam_id}"))
    r.done()
    return cameras


def read_images_bin(path: Path) -> list[Image]:
    r = _Reader(path)
    (count,) = r.take("Q", "the number of images")
    images = []
    for n in range(count):
        image_id, *qt, cam_id = r.take("i7di", f"image {n} (image_id, qvec, tvec, camera_id)")
        name = r.string(f"image {image_id} name")
        (num,) = r.take("Q", f"image {image_id} num_points2D")
        pts = r.array(POINT2D, num, f"image {image_id} points2D")
        where = f"{path}: image {image_id}"
        images.append(Image(image_id, name, cam_id, _pose(qt[:4], qt[4:], name, where),
                            np.stack([pts["x"], pts["y"]], axis=1), pts["id"].astype(np.int64), where))
    r.done()
    return images


def read_points3d_bin(path: Path) -> tuple[np.ndarray, np.ndarray]:
    r = _Reader(path)
    (count,) = r.take("Q", "the number of points")
    ids, xyz = np.empty(count, np.int64), np.empty((count, 3))
    for n in range(count):
        pid, x, y, z, _, _, _, _, track = r.take("Q3d3BdQ", f"point {n} (id, xyz, rgb, error, track_length)")
        ids[n], xyz[n] = pid, (x, y, z)
        r.pos += 8 * track  # (image_id, point2D_idx) pairs: the images file has the same links
        if r.pos > len(r.data):
            raise SceneFolderError(f"{path}: truncated in the track of point {pid}")
    r.done()
    return ids, xyz
