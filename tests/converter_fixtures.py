"""Fixtures for the converter tests, written from each foreign format's OWN definition, never from
the converter: synthetic captures (3D points seen by look-at cameras), COLMAP's camera models and
its text and binary files, and Gaussian blobs rendered through a distorted camera.

COLMAP definitions used (colmap.github.io/format.html, cameras.html and src/colmap/sensor/models.h):
* pixel coordinates put the centre of the top-left pixel at (0.5, 0.5);
* SIMPLE_RADIAL f cx cy k: u = f x (1 + k r^2) + cx; RADIAL f cx cy k1 k2: (1 + k1 r^2 + k2 r^4);
  OPENCV fx fy cx cy k1 k2 p1 p2: x_d = x (1 + k1 r^2 + k2 r^4) + 2 p1 x y + p2 (r^2 + 2 x^2),
  y_d = y (1 + k1 r^2 + k2 r^4) + p1 (r^2 + 2 y^2) + 2 p2 x y; (x, y) = (X/Z, Y/Z), r^2 = x^2 + y^2;
* model ids 0 SIMPLE_PINHOLE, 1 PINHOLE, 2 SIMPLE_RADIAL, 3 RADIAL, 4 OPENCV;
* binary files little-endian: cameras.bin (uint64 n; int32 id, int32 model, uint64 w, uint64 h,
  float64 params), images.bin (uint64 n; int32 id, float64 q[4], float64 t[3], int32 camera id,
  NUL-terminated name, uint64 n2d, (float64 x, float64 y, int64 point id) each), points3D.bin
  (uint64 n; uint64 id, float64 xyz, uint8 rgb, float64 error, uint64 track length,
  (int32 image id, int32 point2D index) each).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

MODEL_IDS = {"SIMPLE_PINHOLE": 0, "PINHOLE": 1, "SIMPLE_RADIAL": 2, "RADIAL": 3, "OPENCV": 4}


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


def orbit(n: int, radius: float = 4.0, height: float = 1.0, step_deg: float = 12.0) -> np.ndarray:
    return np.stack([look_at((radius * np.cos(np.radians(step_deg * i)), radius * np.sin(np.radians(step_deg * i)),
                              height + 0.1 * i)) for i in range(n)])


def matrix_to_quaternion(R: np.ndarray) -> np.ndarray:
    """Rotation matrix -> Hamilton unit quaternion (w, x, y, z), w >= 0 (Shepperd's method)."""
    tr = np.trace(R)
    if tr > 0:
        s = 2 * np.sqrt(1 + tr)
        q = [0.25 * s, (R[2, 1] - R[1, 2]) / s, (R[0, 2] - R[2, 0]) / s, (R[1, 0] - R[0, 1]) / s]
    else:
        i = int(np.argmax(np.diag(R)))
        j, k = (i + 1) % 3, (i + 2) % 3
        s = 2 * np.sqrt(1 + R[i, i] - R[j, j] - R[k, k])
        q = [0.0] * 4
        q[0] = (R[k, j] - R[j, k]) / s
        q[1 + i] = 0.25 * s
        q[1 + j] = (R[j, i] + R[i, j]) / s
        q[1 + k] = (R[k, i] + R[i, k]) / s
    q = np.array(q)
    return q if q[0] >= 0 else -q


def colmap_focal_centre(model: str, params) -> tuple[float, float, float, float]:
    p = list(params)
    if model in ("SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL"):
        return p[0], p[0], p[1], p[2]
    return p[0], p[1], p[2], p[3]


def colmap_distort(model: str, params, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ideal normalised (x, y) -> distorted normalised, per COLMAP's model definitions."""
    p = list(params)
    r2 = x * x + y * y
    if model in ("SIMPLE_PINHOLE", "PINHOLE"):
        return x, y
    if model == "SIMPLE_RADIAL":
        radial = 1 + p[3] * r2
        return x * radial, y * radial
    if model == "RADIAL":
        radial = 1 + p[3] * r2 + p[4] * r2 * r2
        return x * radial, y * radial
    if model == "OPENCV":
        k1, k2, p1, p2 = p[4:8]
        radial = 1 + k1 * r2 + k2 * r2 * r2
        return (x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x),
                y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y)
    raise ValueError(model)


def colmap_project(model: str, params, w2c: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World points [N, 3] -> (COLMAP pixel coordinates [N, 2], depth [N])."""
    Xc = X @ w2c[:3, :3].T + w2c[:3, 3]
    x, y = Xc[:, 0] / Xc[:, 2], Xc[:, 1] / Xc[:, 2]
    xd, yd = colmap_distort(model, params, x, y)
    fx, fy, cx, cy = colmap_focal_centre(model, params)
    return np.stack([fx * xd + cx, fy * yd + cy], axis=1), Xc[:, 2]


def colmap_undistort_normalised(model: str, params, u: np.ndarray, v: np.ndarray, iters: int = 100):
    """COLMAP pixel coordinates -> ideal normalised (x, y), by a plain fixed-point iteration."""
    fx, fy, cx, cy = colmap_focal_centre(model, params)
    xd, yd = (u - cx) / fx, (v - cy) / fy
    x, y = xd.copy(), yd.copy()
    for _ in range(iters):
        dx, dy = colmap_distort(model, params, x, y)
        x, y = x + (xd - dx), y + (yd - dy)
    return x, y


def render_blobs(model: str, params, w: int, h: int, centres: np.ndarray, sigma_px: float) -> np.ndarray:
    """uint8 [h, w, 3] image of the distorted camera: Gaussian blobs of `sigma_px` (ideal-image
    pixels) around the ideal normalised `centres` [M, 2]. Array index (i, j) is COLMAP's (j + 0.5, i + 0.5)."""
    jj, ii = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    x, y = colmap_undistort_normalised(model, params, jj + 0.5, ii + 0.5)
    fx, fy, _, _ = colmap_focal_centre(model, params)
    img = np.zeros((h, w))
    for cxn, cyn in centres:
        img += np.exp(-(((x - cxn) * fx) ** 2 + ((y - cyn) * fy) ** 2) / (2 * sigma_px ** 2))
    img = np.clip(np.rint(255 * img), 0, 255).astype(np.uint8)
    return np.repeat(img[..., None], 3, axis=2)


def blob_centroid(gray: np.ndarray, uv: np.ndarray, radius: int = 6) -> np.ndarray:
    """Intensity centroid (array index convention: pixel centres at integers) in a window."""
    u0, v0 = int(round(uv[0])), int(round(uv[1]))
    win = gray[v0 - radius:v0 + radius + 1, u0 - radius:u0 + radius + 1].astype(np.float64)
    win = np.clip(win - 8, 0, None)  # drop the quantisation floor
    vv, uu = np.mgrid[v0 - radius:v0 + radius + 1, u0 - radius:u0 + radius + 1]
    return np.array([(win * uu).sum() / win.sum(), (win * vv).sum() / win.sum()])


def save_rgb(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1]))  # cv2 writes BGR


# ----------------------------------------------------------------------------------------------
# A COLMAP reconstruction


@dataclass
class ColmapCapture:
    cameras: dict[int, tuple[str, int, int, list[float]]]  # id -> (model, w, h, params)
    images: list[dict]  # id, name, camera_id, w2c, xy [n, 2] (COLMAP px), point_ids [n]
    point_ids: np.ndarray
    xyz: np.ndarray
    c2w: dict[str, np.ndarray] = field(default_factory=dict)  # by image name, OpenCV


def make_capture(names: list[str], cameras: dict[int, tuple[str, int, int, list[float]]], camera_of: list[int],
                 num_points: int = 150, seed: int = 0) -> ColmapCapture:
    """Points in a box, orbit cameras; each image observes the points that land on it, in a
    shuffled order, plus a few untriangulated 2D points (id -1)."""
    rng = np.random.default_rng(seed)
    xyz = rng.uniform(-1, 1, (num_points, 3)) * [1.0, 1.0, 0.5]
    point_ids = rng.permutation(np.arange(1, 10 * num_points))[:num_points].astype(np.int64)
    c2ws = orbit(len(names))
    images = []
    for n, (name, cam_id) in enumerate(zip(names, camera_of)):
        model, w, h, params = cameras[cam_id]
        w2c = np.linalg.inv(c2ws[n])
        xy, z = colmap_project(model, params, w2c, xyz)
        on = (z > 0) & (xy[:, 0] >= 0) & (xy[:, 0] <= w) & (xy[:, 1] >= 0) & (xy[:, 1] <= h)
        idx = rng.permutation(np.flatnonzero(on))
        extra = rng.uniform([0, 0], [w, h], (3, 2))
        images.append({"id": 10 + n, "name": name, "camera_id": cam_id, "w2c": w2c,
                       "xy": np.concatenate([xy[idx], extra]),
                       "point_ids": np.concatenate([point_ids[idx], [-1, -1, -1]]).astype(np.int64)})
    return ColmapCapture(cameras, images, point_ids, xyz, {name: c for name, c in zip(names, c2ws)})


def _tracks(cap: ColmapCapture) -> dict[int, list[tuple[int, int]]]:
    tracks: dict[int, list[tuple[int, int]]] = {int(p): [] for p in cap.point_ids}
    for im in cap.images:
        for k, pid in enumerate(im["point_ids"]):
            if pid >= 0:
                tracks[int(pid)].append((im["id"], k))
    return tracks


def write_colmap_text(folder: Path, cap: ColmapCapture) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["# Camera list with one line of data per camera:", "#   CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]"]
    lines += [f"{cid} {m} {w} {h} " + " ".join(repr(float(p)) for p in params)
              for cid, (m, w, h, params) in cap.cameras.items()]
    (folder / "cameras.txt").write_text("\n".join(lines) + "\n")
    lines = ["# Image list with two lines of data per image:"]
    for im in cap.images:
        q, t = matrix_to_quaternion(im["w2c"][:3, :3]), im["w2c"][:3, 3]
        pose = [repr(float(v)) for v in (*q, *t)]
        lines.append(" ".join([str(im["id"]), *pose, str(im["camera_id"]), im["name"]]))
        lines.append(" ".join(f"{x!r} {y!r} {int(p)}" for (x, y), p in zip(im["xy"].tolist(), im["point_ids"])))
    (folder / "images.txt").write_text("\n".join(lines) + "\n")
    tracks = _tracks(cap)
    lines = ["# 3D point list with one line of data per point:"]
    for pid, X in zip(cap.point_ids, cap.xyz):
        track = " ".join(f"{i} {k}" for i, k in tracks[int(pid)])
        lines.append(f"{pid} " + " ".join(repr(float(v)) for v in X) + f" 128 64 32 0.5 {track}")
    (folder / "points3D.txt").write_text("\n".join(lines) + "\n")


def write_colmap_binary(folder: Path, cap: ColmapCapture) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    out = [struct.pack("<Q", len(cap.cameras))]
    for cid, (m, w, h, params) in cap.cameras.items():
        out.append(struct.pack("<iiQQ", cid, MODEL_IDS[m], w, h) + struct.pack(f"<{len(params)}d", *params))
    (folder / "cameras.bin").write_bytes(b"".join(out))
    out = [struct.pack("<Q", len(cap.images))]
    for im in cap.images:
        q, t = matrix_to_quaternion(im["w2c"][:3, :3]), im["w2c"][:3, 3]
        out.append(struct.pack("<i4d3di", im["id"], *q, *t, im["camera_id"]) + im["name"].encode() + b"\0")
        out.append(struct.pack("<Q", len(im["xy"])))
        out += [struct.pack("<ddq", x, y, int(p)) for (x, y), p in zip(im["xy"].tolist(), im["point_ids"])]
    (folder / "images.bin").write_bytes(b"".join(out))
    tracks = _tracks(cap)
    out = [struct.pack("<Q", len(cap.point_ids))]
    for pid, X in zip(cap.point_ids, cap.xyz):
        track = tracks[int(pid)]
        out.append(struct.pack("<Q3d3BdQ", int(pid), *X, 128, 64, 32, 0.5, len(track)))
        out += [struct.pack("<ii", i, k) for i, k in track]
    (folder / "points3D.bin").write_bytes(b"".join(out))


def opencv_project(K: np.ndarray, c2w: np.ndarray, X: np.ndarray) -> np.ndarray:
    """Pinhole projection [N, 3] -> [N, 2] in the project's convention (K and c2w as stored)."""
    Xc = (X - c2w[:3, 3]) @ c2w[:3, :3]
    uvw = Xc @ K.T
    return uvw[:, :2] / uvw[:, 2:3]
