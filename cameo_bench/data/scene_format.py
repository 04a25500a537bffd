"""Scene folder v1: write, read and validate the one on-disk format every dataset is converted into.

Layout (notes/data.md §1.4)::

    <root>/dataset.json                      {"format": "cameo_bench/scene-v1", "name", "splits"}
    <root>/scenes/<scene_id>/
        images/<frame>.png|jpg               uint8 RGB; K refers to this stored size
        cameras.json                         per frame: name, image, w, h, K, c2w (+ depth, mask)
        depth/<frame>.npy                    optional float16 z-depth, 0 or non-finite = invalid
        masks/<frame>.png                    optional uint8 foreground/validity mask
        pointmaps/<source>/<frame>.npz       optional xyz float16 [h,w,3] (world frame), conf [h,w]
        points3d.npz                         optional sparse 3D points: xyz float32 [P,3] (world), ids int64 [P]
        tracks/<frame>.npz                   with points3d: point_ids int64 [n], uv float32 [n,2] (pixels)
        meta.json                            provenance (source dataset, seed, licence tag, ...)

Sparse tracks (e.g. COLMAP's points3D and their 2D observations) are exact correspondences without
dense depth: point `ids[p]` is seen in frame f at `uv[k]` where `point_ids[k] == ids[p]`, in pixels of
the stored image and the same pixel convention as K. `cameras.json` says `"tracks": true` when a
scene has them; then every frame has a track file (possibly empty).

Cameras are OpenCV (x right, y down, z forward), camera-to-world, K in pixels with the centre of
the top-left pixel at (0, 0). Foreign conventions are converted once, by the converters, so that
nothing downstream ever needs to know where a scene came from.

Everything read is validated at this boundary and every error names the file (and the field) it
came from, because a silently wrong camera invalidates every correspondence built on it. Sampling
training items from a folder is `scene_dataset`'s job.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

FORMAT = "cameo_bench/scene-v1"
POINTS3D = "points3d.npz"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEPTH_SOURCES = ("none", "gt_render", "gt_sensor", "mvs", "mono_aligned", "synthetic")
FLOAT16_MAX = float(np.finfo(np.float16).max)
# Cameras are stored as float64 text but often computed in float32: allow float32 round-off.
RIGID_TOL = 1e-4


class SceneFolderError(ValueError):
    """Bad or inconsistent scene-folder content; the message names the file and the field."""


# ----------------------------------------------------------------------------------------------
# Containers


@dataclass
class SceneCameras:
    """What `cameras.json` says about a scene: enough to choose views without decoding images."""

    folder: Path
    names: list[str]
    image_paths: list[Path]
    sizes: np.ndarray  # [F, 2] (h, w) of the stored images
    K: np.ndarray  # [F, 3, 3] float64, pixels
    c2w: np.ndarray  # [F, 4, 4] float64, OpenCV camera-to-world
    depth_paths: list[Path] | None = None
    mask_paths: list[Path] | None = None
    pointmap_sources: list[str] = field(default_factory=list)
    depth_source: str = "none"
    scale_is_metric: bool = False
    has_tracks: bool = False  # points3d.npz + tracks/<frame>.npz (see the module docstring)

    def __len__(self) -> int:
        return len(self.names)

    def pointmap_path(self, source: str, i: int) -> Path:
        return self.folder / "pointmaps" / source / f"{self.names[i]}.npz"

    @property
    def points3d_path(self) -> Path:
        return self.folder / POINTS3D

    def track_path(self, i: int) -> Path:
        return self.folder / "tracks" / f"{self.names[i]}.npz"


@dataclass
class SparseTracks:
    """Sparse 3D points and, per frame, which of them it observes where (interface of `tracks/`).

    ids int64 [P] (unique), xyz float [P, 3] world frame; frames: per frame (point_ids int64 [n],
    uv float [n, 2]) in pixels of the stored image, centre of the top-left pixel at (0, 0).
    """

    ids: np.ndarray
    xyz: np.ndarray
    frames: list[tuple[np.ndarray, np.ndarray]]


@dataclass
class EncodedImage:
    """An already encoded png/jpg (e.g. JPEG bytes from a dataset chunk), written as is; `origin`
    names where it came from in errors (the temporary file it is written to would mean nothing).

    Foreign bytes are decoded once when written, so a corrupt frame fails at conversion; `hw` may be
    given only by code that has just encoded the bytes from an array of that size (undistortion),
    which skips that decode.
    """

    data: bytes
    origin: str
    hw: tuple[int, int] | None = None


@dataclass
class Scene:
    """A fully loaded scene (small scenes, tests, tools); the dataset loads frames lazily instead."""

    cameras: SceneCameras
    images: list[np.ndarray]  # F x uint8 [H, W, 3]
    depth: list[np.ndarray] | None  # F x float32 [H, W]
    masks: list[np.ndarray] | None  # F x uint8 [H, W]
    point_maps: dict[str, tuple[list[np.ndarray], list[np.ndarray]]]  # source -> (xyz [h,w,3], conf [h,w])
    meta: dict
    tracks: SparseTracks | None = None

    @property
    def names(self) -> list[str]:
        return self.cameras.names

    @property
    def K(self) -> np.ndarray:
        return self.cameras.K

    @property
    def c2w(self) -> np.ndarray:
        return self.cameras.c2w


# ----------------------------------------------------------------------------------------------
# Writing


def write_scene(
    folder: str | Path,
    images: Sequence,
    K,
    c2w,
    depth=None,
    point_maps: Mapping | None = None,
    meta: Mapping | None = None,
    *,
    masks=None,
    names: Sequence[str] | None = None,
    depth_source: str | None = None,
    scale_is_metric: bool = False,
    tracks: SparseTracks | None = None,
    overwrite: bool = False,
) -> Path:
    """Write one scene folder; it appears complete or not at all (temporary folder + rename).

    images: per frame a uint8 array [H, W, 3], a float array/tensor [3, H, W] in [0, 1] (the batch
        format), a path to an existing png/jpg that is copied byte for byte (no re-encoding), an
        `EncodedImage` (png/jpg bytes, written as is), or a zero-argument callable returning one of
        these (so converters that undistort or decode need not hold a sequence in memory).
    K [F, 3, 3], c2w [F, 4, 4]: OpenCV pixel intrinsics and camera-to-world poses.
    depth: optional [F, H, W] z-depth (stored float16). masks: optional [F, H, W] uint8.
        Items of either may be zero-argument callables, so converters need not hold a whole
        sequence of full-resolution maps in memory.
    point_maps: optional {source: xyz [F, h, w, 3] or (xyz, conf [F, h, w])}, world frame.
    tracks: optional `SparseTracks` (points3d.npz + tracks/<frame>.npz).
    """
    folder = Path(folder)
    num = len(images)
    K = _as_numpy(K, "K").astype(np.float64)
    c2w = _as_numpy(c2w, "c2w").astype(np.float64)
    _check_count("K", K, num)
    _check_count("c2w", c2w, num)
    if names is None:
        names = [f"{i:06d}" for i in range(num)]
    names = [str(n) for n in names]
    _check_count("names", names, num)
    if len(set(names)) != num:
        raise SceneFolderError(f"{folder}: frame names are not unique")
    for key, value in (("depth", depth), ("masks", masks)):
        if value is not None:
            _check_count(key, value, num)
    for source, value in (point_maps or {}).items():
        xyz = value[0] if isinstance(value, tuple) else value
        _check_count(f"point_maps[{source!r}]", xyz, num)
    if tracks is not None:
        _check_count("tracks.frames", tracks.frames, num)
    if depth_source is None:
        depth_source = "none" if depth is None else "gt_render"
    if depth_source not in DEPTH_SOURCES:
        raise SceneFolderError(f"depth_source {depth_source!r} is not one of {DEPTH_SOURCES}")

    with _atomic_folder(folder, overwrite) as tmp:
        (tmp / "images").mkdir()
        frames = []
        for i, name in enumerate(names):
            rel_image, (h, w) = _write_image(tmp, name, images[i])
            frame = {"name": name, "image": rel_image, "w": w, "h": h}
            frame["K"] = validate_K(K[i], f"K[{i}]").tolist()
            frame["c2w"] = validate_c2w(c2w[i], f"c2w[{i}]").tolist()
            if depth is not None:
                frame["depth"] = _write_depth(tmp, name, depth[i], (h, w), f"depth[{i}]")
            if masks is not None:
                frame["mask"] = _write_mask(tmp, name, masks[i], (h, w), f"masks[{i}]")
            frames.append(frame)
        for source, value in (point_maps or {}).items():
            xyz, conf = value if isinstance(value, tuple) else (value, None)
            (tmp / "pointmaps" / source).mkdir(parents=True)
            for i, name in enumerate(names):
                _write_pointmap(tmp / "pointmaps" / source / f"{name}.npz", xyz[i],
                                None if conf is None else conf[i], f"point_maps[{source!r}][{i}]")
        if tracks is not None:
            _write_tracks(tmp, names, tracks, [(f["h"], f["w"]) for f in frames])
        cameras = {
            "convention": "opencv", "pose": "c2w", "depth": "z",
            "frames": frames,
            "scale": 1.0, "scale_is_metric": bool(scale_is_metric),
            "depth_source": depth_source,
            "pointmap_sources": sorted(point_maps or {}),
        }
        if tracks is not None:
            cameras["tracks"] = True
        (tmp / "cameras.json").write_text(_cameras_json(cameras))
        _write_json(tmp / "meta.json", dict(meta or {}))
    return folder


def write_dataset_index(root: str | Path, splits: Mapping[str, Sequence[str]], name: str | None = None) -> Path:
    """Write `dataset.json`; every listed scene must already exist under `scenes/`."""
    root = Path(root)
    for split, scene_ids in splits.items():
        for scene_id in scene_ids:
            if not (scene_dir(root, scene_id) / "cameras.json").is_file():
                raise SceneFolderError(f"{root}: split {split!r} lists scene {scene_id!r} with no cameras.json")
    index = {"format": FORMAT, "name": name or root.name, "splits": {k: list(v) for k, v in splits.items()}}
    path = root / "dataset.json"
    _write_json(path, index)
    return path


class DatasetWriter:
    """Writes a whole dataset into a temporary folder and renames it into place on success.

    A conversion that fails half-way therefore leaves nothing at `out` (the promise of the CLI).
    Use as a context manager: `with DatasetWriter(out) as w: w.add(scene_id, split, images, K, ...)`.
    """

    def __init__(self, out: str | Path, name: str | None = None, overwrite: bool = False):
        self.out = Path(out)
        self.name = name or self.out.name
        self.overwrite = overwrite
        self.splits: dict[str, list[str]] = {}
        self._ctx = None
        self.root: Path | None = None

    def __enter__(self) -> DatasetWriter:
        self._ctx = _atomic_folder(self.out, self.overwrite)
        self.root = self._ctx.__enter__()
        return self

    def add(self, scene_id: str, split: str, *args, **kwargs) -> Path:
        """`write_scene` arguments after the folder; records the scene in `split`."""
        if any(scene_id in ids for ids in self.splits.values()):
            raise SceneFolderError(f"{self.out}: duplicate scene id {scene_id!r}")
        _check_scene_id(scene_id)
        path = write_scene(scene_dir(self.root, scene_id), *args, **kwargs)
        self.splits.setdefault(split, []).append(scene_id)
        return path

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:  # the body failed: drop the temporary folder, let it propagate
            self._ctx.__exit__(exc_type, exc, tb)
            return False
        try:
            if not self.splits:
                raise SceneFolderError(f"{self.out}: no scenes were written")
            write_dataset_index(self.root, self.splits, self.name)
        except BaseException as e:
            self._ctx.__exit__(type(e), e, e.__traceback__)
            raise
        self._ctx.__exit__(None, None, None)
        return False


# ----------------------------------------------------------------------------------------------
# Reading


def scene_dir(root: str | Path, scene_id: str) -> Path:
    return Path(root) / "scenes" / scene_id


def read_dataset_index(root: str | Path) -> dict:
    """Parse and validate `<root>/dataset.json`."""
    path = Path(root) / "dataset.json"
    index = _read_json(path)
    if index.get("format") != FORMAT:
        raise SceneFolderError(f"{path}: field 'format' is {index.get('format')!r}, expected {FORMAT!r}")
    splits = index.get("splits")
    if not isinstance(splits, dict) or not all(isinstance(v, list) for v in splits.values()):
        raise SceneFolderError(f"{path}: field 'splits' must map split names to lists of scene ids")
    return index


def read_cameras(folder: str | Path) -> SceneCameras:
    """Parse and validate `cameras.json` (conventions, K, rigid c2w, referenced files exist)."""
    folder = Path(folder)
    path = folder / "cameras.json"
    data = _read_json(path)
    expected = {"convention": "opencv", "pose": "c2w", "depth": "z"}
    for key, value in expected.items():
        if data.get(key) != value:
            raise SceneFolderError(f"{path}: field {key!r} is {data.get(key)!r}, expected {value!r}")
    frames = data.get("frames")
    if not isinstance(frames, list) or not frames:
        raise SceneFolderError(f"{path}: field 'frames' must be a non-empty list")
    names, image_paths, sizes, Ks, c2ws = [], [], [], [], []
    depth_paths, mask_paths = [], []
    for i, frame in enumerate(frames):
        where = f"{path}: frames[{i}]"
        try:
            names.append(str(frame["name"]))
            image_paths.append(_existing(folder, frame["image"], f"{where}.image"))
            sizes.append((int(frame["h"]), int(frame["w"])))
            Ks.append(validate_K(frame["K"], f"{where}.K"))
            c2ws.append(validate_c2w(frame["c2w"], f"{where}.c2w"))
        except KeyError as e:
            raise SceneFolderError(f"{where}: missing field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise SceneFolderError(f"{where}: malformed frame entry ({e})") from None
        depth_paths.append(_existing(folder, frame["depth"], f"{where}.depth") if "depth" in frame else None)
        mask_paths.append(_existing(folder, frame["mask"], f"{where}.mask") if "mask" in frame else None)
    if len(set(names)) != len(names):
        raise SceneFolderError(f"{path}: frame names are not unique")
    cameras = SceneCameras(
        folder=folder, names=names, image_paths=image_paths, sizes=np.array(sizes, dtype=np.int64),
        K=np.stack(Ks), c2w=np.stack(c2ws),
        depth_paths=_all_or_none(depth_paths, path, "depth"),
        mask_paths=_all_or_none(mask_paths, path, "mask"),
        pointmap_sources=list(data.get("pointmap_sources", [])),
        depth_source=str(data.get("depth_source", "none")),
        scale_is_metric=bool(data.get("scale_is_metric", False)),
        has_tracks=bool(data.get("tracks", False)),
    )
    if cameras.has_tracks:
        missing = [p for p in [cameras.points3d_path, *map(cameras.track_path, range(len(cameras)))]
                   if not p.is_file()]
        if missing:
            raise SceneFolderError(f"{path}: field 'tracks' is true but {missing[0]} is missing"
                                   + (f" (and {len(missing) - 1} more track files)" if len(missing) > 1 else ""))
    for source in cameras.pointmap_sources:
        for i in range(len(cameras)):
            if not cameras.pointmap_path(source, i).is_file():
                raise SceneFolderError(f"{path}: pointmap_sources lists {source!r} but "
                                       f"{cameras.pointmap_path(source, i)} is missing")
    return cameras


def _decode(path, mode: str, what: str, origin: str | None = None) -> np.ndarray:
    """Decode fully, so that a truncated file fails here, naming it, not in a DataLoader worker later."""
    try:
        with Image.open(path) as im:
            im.load()
            return np.array(im.convert(mode))
    except (OSError, ValueError, SyntaxError) as e:
        raise SceneFolderError(f"{origin or path}: cannot decode {what} ({e})") from None


def read_image(path: Path, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """-> uint8 [H, W, 3] RGB."""
    array = _decode(path, "RGB", "image")
    if expected_hw is not None and array.shape[:2] != tuple(expected_hw):
        raise SceneFolderError(f"{path}: image is {array.shape[0]}x{array.shape[1]} (HxW) but "
                               f"cameras.json says {expected_hw[0]}x{expected_hw[1]}")
    return array


def read_depth(path: Path, expected_hw: tuple[int, int]) -> np.ndarray:
    """-> float32 [H, W] z-depth."""
    array = _load_npy(path)
    if array.shape != tuple(expected_hw) or not np.issubdtype(array.dtype, np.floating):
        raise SceneFolderError(f"{path}: depth must be a float array of shape {tuple(expected_hw)}, "
                               f"got {array.dtype} {array.shape}")
    return array.astype(np.float32)


def read_mask(path: Path, expected_hw: tuple[int, int]) -> np.ndarray:
    """-> uint8 [H, W]."""
    array = _decode(path, "L", "mask")
    if array.shape != tuple(expected_hw):
        raise SceneFolderError(f"{path}: mask is {array.shape}, expected {tuple(expected_hw)}")
    return array


def read_pointmap(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """-> (xyz float32 [h, w, 3] world frame, conf float32 [h, w])."""
    try:
        with np.load(path) as data:
            xyz, conf = data["xyz"], data["conf"]
    except KeyError as e:
        raise SceneFolderError(f"{path}: missing array {e.args[0]!r} (expected 'xyz' and 'conf')") from None
    except (OSError, ValueError, EOFError) as e:
        raise SceneFolderError(f"{path}: cannot read point map ({e})") from None
    if xyz.ndim != 3 or xyz.shape[-1] != 3 or conf.shape != xyz.shape[:2]:
        raise SceneFolderError(f"{path}: expected xyz [h,w,3] and conf [h,w], got {xyz.shape} and {conf.shape}")
    return xyz.astype(np.float32), conf.astype(np.float32)


def _ids_and_vectors(path: Path, names: tuple[str, str], width: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Integer ids [n] and finite vectors [n, width] of one npz file, checked, as (int64, float32)."""
    ids, vectors = _load_npz(path, names, what)
    if ids.ndim != 1 or vectors.shape != (len(ids), width) or not np.issubdtype(ids.dtype, np.integer):
        raise SceneFolderError(f"{path}: expected integer {names[0]} [n] and {names[1]} [n, {width}], got "
                               f"{ids.dtype} {ids.shape} and {vectors.shape}")
    if not np.isfinite(vectors).all():
        raise SceneFolderError(f"{path}: field {names[1]!r} is not finite")
    return ids.astype(np.int64), vectors.astype(np.float32)


def read_points3d(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """`points3d.npz` -> (ids int64 [P], xyz float32 [P, 3] world frame)."""
    ids, xyz = _ids_and_vectors(path, ("ids", "xyz"), 3, "sparse points")
    if len(np.unique(ids)) != len(ids):
        raise SceneFolderError(f"{path}: field 'ids' has duplicate point ids")
    return ids, xyz


def read_track(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """`tracks/<frame>.npz` -> (point_ids int64 [n], uv float32 [n, 2] stored-image pixels)."""
    return _ids_and_vectors(path, ("point_ids", "uv"), 2, "track")


def read_tracks(cameras: SceneCameras) -> SparseTracks | None:
    """All tracks of a scene (None without); every observed id must be one of points3d's ids."""
    if not cameras.has_tracks:
        return None
    ids, xyz = read_points3d(cameras.points3d_path)
    frames = []
    for i in range(len(cameras)):
        point_ids, uv = read_track(cameras.track_path(i))
        unknown = np.setdiff1d(point_ids, ids)
        if len(unknown):
            raise SceneFolderError(f"{cameras.track_path(i)}: field 'point_ids' has ids not in "
                                   f"{cameras.points3d_path} (e.g. {unknown[:5].tolist()})")
        frames.append((point_ids, uv))
    return SparseTracks(ids, xyz, frames)


def read_scene(folder: str | Path) -> Scene:
    """Load and validate a whole scene folder (every file it references)."""
    folder = Path(folder)
    cams = read_cameras(folder)
    hw = [(int(h), int(w)) for h, w in cams.sizes]
    images = [read_image(p, hw[i]) for i, p in enumerate(cams.image_paths)]
    depth = None if cams.depth_paths is None else [read_depth(p, hw[i]) for i, p in enumerate(cams.depth_paths)]
    masks = None if cams.mask_paths is None else [read_mask(p, hw[i]) for i, p in enumerate(cams.mask_paths)]
    point_maps = {}
    for source in cams.pointmap_sources:
        loaded = [read_pointmap(cams.pointmap_path(source, i)) for i in range(len(cams))]
        point_maps[source] = ([x for x, _ in loaded], [c for _, c in loaded])
    meta_path = folder / "meta.json"
    meta = _read_json(meta_path) if meta_path.exists() else {}
    return Scene(cams, images, depth, masks, point_maps, meta, tracks=read_tracks(cams))


# ----------------------------------------------------------------------------------------------
# Validation and file helpers


def _as_numpy(value, key: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as e:
        raise SceneFolderError(f"{key}: cannot convert to an array ({e})") from None


def _check_count(key: str, value, num: int) -> None:
    if len(value) != num:
        raise SceneFolderError(f"{key} has {len(value)} frames but images has {num}")


def _finite_matrix(value, size: int, what: str, where: str) -> np.ndarray:
    m = np.asarray(value, dtype=np.float64)
    if m.shape != (size, size):
        raise SceneFolderError(f"{where}: {what} must be {size}x{size}, got shape {m.shape}")
    if not np.isfinite(m).all():
        raise SceneFolderError(f"{where}: {what} is not finite: {m.tolist()}")
    return m


def validate_K(K, where: str) -> np.ndarray:
    K = _finite_matrix(K, 3, "intrinsics matrix", where)
    if K[0, 0] <= 0 or K[1, 1] <= 0 or K[1, 0] != 0 or not np.allclose(K[2], [0, 0, 1]):
        raise SceneFolderError(f"{where}: not a pinhole intrinsics matrix "
                               f"(need fx, fy > 0 and last row [0, 0, 1]): {K.tolist()}")
    return K


def validate_c2w(c2w, where: str) -> np.ndarray:
    c2w = _finite_matrix(c2w, 4, "cam2world", where)
    R = c2w[:3, :3]
    ortho_err = float(np.abs(R.T @ R - np.eye(3)).max())
    if ortho_err > RIGID_TOL or np.linalg.det(R) <= 0 or np.abs(c2w[3] - [0, 0, 0, 1]).max() > 1e-6:
        raise SceneFolderError(f"{where}: cam2world is not a rigid transform (max |R^T R - I| = "
                               f"{ortho_err:.2e}, det R = {np.linalg.det(R):.4f}, last row "
                               f"{c2w[3].tolist()})")
    return c2w


def _check_scene_id(scene_id: str) -> None:
    parts = Path(scene_id).parts
    if not parts or Path(scene_id).is_absolute() or any(p in ("..", ".") for p in parts):
        raise SceneFolderError(f"scene id {scene_id!r} must be a relative path without '.' or '..'")


def _existing(folder: Path, rel: str, where: str) -> Path:
    path = folder / rel
    if not path.is_file():
        raise SceneFolderError(f"{where}: file {path} does not exist")
    return path


def _all_or_none(paths: list, path: Path, key: str) -> list | None:
    present = [p is not None for p in paths]
    if any(present) and not all(present):
        raise SceneFolderError(f"{path}: field {key!r} is given for frames "
                               f"{[i for i, p in enumerate(present) if p]} only; it must be all or none")
    return paths if all(present) else None


def _write_image(folder: Path, name: str, image) -> tuple[str, tuple[int, int]]:
    if callable(image):
        image = image()
    if isinstance(image, EncodedImage):
        suffix = _encoded_suffix(image.data)
        if suffix is None:
            raise SceneFolderError(f"{image.origin}: not a png or jpg (first bytes {image.data[:8]!r})")
        if image.hw is not None:
            h, w = image.hw
        else:
            h, w = _decode(io.BytesIO(image.data), "RGB", "image", image.origin).shape[:2]  # a corrupt frame fails now
        rel = f"images/{name}{suffix}"
        (folder / rel).write_bytes(image.data)
        return rel, (h, w)
    if isinstance(image, (str, os.PathLike)):
        src = Path(image)
        suffix = src.suffix.lower()
        if suffix not in IMAGE_SUFFIXES:
            raise SceneFolderError(f"{src}: unsupported image type {suffix!r} (use one of {IMAGE_SUFFIXES})")
        h, w = read_image(src).shape[:2]  # decode once so corrupt sources fail now, naming the file
        rel = f"images/{name}{suffix}"
        shutil.copyfile(src, folder / rel)
        return rel, (h, w)
    array = _as_numpy(image, f"image {name!r}")
    if np.issubdtype(array.dtype, np.floating):
        if array.ndim != 3 or array.shape[0] != 3:
            raise SceneFolderError(f"image {name!r}: float images must be [3, H, W] in [0, 1], got {array.shape}")
        array = np.clip(np.rint(array.transpose(1, 2, 0) * 255.0), 0, 255).astype(np.uint8)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise SceneFolderError(f"image {name!r}: expected uint8 [H, W, 3] or float [3, H, W], "
                               f"got {array.dtype} {array.shape}")
    rel = f"images/{name}.png"
    Image.fromarray(array).save(folder / rel, format="PNG", compress_level=1)
    return rel, array.shape[:2]


def _encoded_suffix(data: bytes) -> str | None:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    if data[:3] == b"\xff\xd8\xff":
        return ".jpg"
    return None


def _write_tracks(folder: Path, names: list[str], tracks: SparseTracks, sizes: list[tuple[int, int]]) -> None:
    """points3d.npz + one tracks/<frame>.npz per frame; observations must lie on their image."""
    ids = _as_numpy(tracks.ids, "tracks.ids")
    xyz = _as_numpy(tracks.xyz, "tracks.xyz").astype(np.float64)
    if ids.ndim != 1 or xyz.shape != (len(ids), 3) or not np.issubdtype(ids.dtype, np.integer):
        raise SceneFolderError(f"tracks: expected integer ids [P] and xyz [P, 3], got {ids.dtype} {ids.shape} "
                               f"and {xyz.shape}")
    if len(np.unique(ids)) != len(ids) or not np.isfinite(xyz).all():
        raise SceneFolderError("tracks: ids must be unique and xyz finite")
    np.savez(folder / POINTS3D, xyz=xyz.astype(np.float32), ids=ids.astype(np.int64))
    (folder / "tracks").mkdir()
    for i, (name, (point_ids, uv), (h, w)) in enumerate(zip(names, tracks.frames, sizes)):
        point_ids = _as_numpy(point_ids, f"tracks.frames[{i}]").astype(np.int64).reshape(-1)
        uv = _as_numpy(uv, f"tracks.frames[{i}]").astype(np.float64).reshape(-1, 2)
        where = f"tracks.frames[{i}] (frame {name!r})"
        if len(uv) != len(point_ids) or not np.isfinite(uv).all():
            raise SceneFolderError(f"{where}: need finite uv [n, 2] for n point ids, got {uv.shape} for "
                                   f"{len(point_ids)}")
        unknown = np.setdiff1d(point_ids, ids)
        if len(unknown):
            raise SceneFolderError(f"{where}: point ids {unknown[:5].tolist()} are not in tracks.ids")
        off = (uv[:, 0] < -0.5) | (uv[:, 0] > w - 0.5) | (uv[:, 1] < -0.5) | (uv[:, 1] > h - 0.5)
        if off.any():
            raise SceneFolderError(f"{where}: {int(off.sum())} observations lie outside the {h}x{w} image, "
                                   f"e.g. uv = {uv[off][0].tolist()}")
        np.savez(folder / "tracks" / f"{name}.npz", point_ids=point_ids, uv=uv.astype(np.float32))


def _write_depth(folder: Path, name: str, depth, hw: tuple[int, int], key: str) -> str:
    depth = _as_numpy(depth() if callable(depth) else depth, key).astype(np.float32)
    if depth.shape != hw:
        raise SceneFolderError(f"{key}: depth shape {depth.shape} does not match its image {hw}")
    finite = np.isfinite(depth)
    if finite.any() and np.abs(depth[finite]).max() > FLOAT16_MAX:
        raise SceneFolderError(f"{key}: depth up to {np.abs(depth[finite]).max():.4g} overflows float16; "
                               "rescale the scene")
    (folder / "depth").mkdir(exist_ok=True)
    rel = f"depth/{name}.npy"
    np.save(folder / rel, depth.astype(np.float16))
    return rel


def _write_mask(folder: Path, name: str, mask, hw: tuple[int, int], key: str) -> str:
    mask = _as_numpy(mask() if callable(mask) else mask, key)
    if mask.shape != hw:
        raise SceneFolderError(f"{key}: mask shape {mask.shape} does not match its image {hw}")
    if mask.dtype == bool:
        mask = mask.astype(np.uint8) * 255
    (folder / "masks").mkdir(exist_ok=True)
    rel = f"masks/{name}.png"
    Image.fromarray(mask.astype(np.uint8)).save(folder / rel, format="PNG", compress_level=1)
    return rel


def _write_pointmap(path: Path, xyz, conf, key: str) -> None:
    xyz = _as_numpy(xyz, key).astype(np.float32)
    if xyz.ndim != 3 or xyz.shape[-1] != 3:
        raise SceneFolderError(f"{key}: point map must be [h, w, 3], got {xyz.shape}")
    conf = np.ones(xyz.shape[:2], np.float32) if conf is None else _as_numpy(conf, key).astype(np.float32)
    if conf.shape != xyz.shape[:2]:
        raise SceneFolderError(f"{key}: conf shape {conf.shape} does not match xyz {xyz.shape[:2]}")
    np.savez(path, xyz=xyz.astype(np.float16), conf=conf.astype(np.float16))


def _load_npz(path: Path, keys: tuple[str, ...], what: str) -> tuple[np.ndarray, ...]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return tuple(data[k] for k in keys)
    except KeyError as e:
        raise SceneFolderError(f"{path}: missing array {e.args[0]!r} (expected {list(keys)})") from None
    except FileNotFoundError:
        raise SceneFolderError(f"{path}: file does not exist") from None
    except (OSError, ValueError, EOFError) as e:
        raise SceneFolderError(f"{path}: cannot read {what} ({e})") from None


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise SceneFolderError(f"{path}: cannot read array ({e})") from None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SceneFolderError(f"{path}: file does not exist") from None
    except (OSError, ValueError) as e:
        raise SceneFolderError(f"{path}: cannot parse JSON ({e})") from None


def _cameras_json(cameras: dict) -> str:
    """One frame per line: readable and diff-able, unlike one number per line."""
    header = [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in cameras.items() if k != "frames"]
    frames = ",\n".join(f"  {json.dumps(frame)}" for frame in cameras["frames"])
    return "{\n" + "\n".join(header) + '\n "frames": [\n' + frames + "\n ]\n}\n"


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")


@contextmanager
def _atomic_folder(folder: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to `folder` only if the block succeeds."""
    folder = Path(folder)
    if folder.exists() and not overwrite and (not folder.is_dir() or any(folder.iterdir())):
        raise SceneFolderError(f"{folder}: already exists (pass overwrite=True / --overwrite to replace it)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.{uuid.uuid4().hex[:8]}.partial"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
