"""Scene folder v1: the one on-disk format every real or synthetic dataset is converted into.

Layout (notes/data.md §1.4)::

    <root>/dataset.json                      {"format": "cameo_bench/scene-v1", "name", "splits"}
    <root>/scenes/<scene_id>/
        images/<frame>.png|jpg               uint8 RGB; K refers to this stored size
        cameras.json                         per frame: name, image, w, h, K, c2w (+ depth, mask)
        depth/<frame>.npy                    optional float16 z-depth, 0 or non-finite = invalid
        masks/<frame>.png                    optional uint8 foreground/validity mask
        pointmaps/<source>/<frame>.npz       optional xyz float16 [h,w,3] (world frame), conf [h,w]
        meta.json                            provenance (source dataset, seed, licence tag, ...)

Cameras are OpenCV (x right, y down, z forward), camera-to-world, K in pixels with the centre of
the top-left pixel at (0, 0). Foreign conventions are converted once, by the converters, so that
nothing downstream ever needs to know where a scene came from.

Everything read is validated at this boundary and every error names the file (and the field) it
came from, because a silently wrong camera invalidates every correspondence built on it.
"""
from __future__ import annotations

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

from cameo_bench.data.batch import validate_batch

FORMAT = "cameo_bench/scene-v1"
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

    def __len__(self) -> int:
        return len(self.names)

    def pointmap_path(self, source: str, i: int) -> Path:
        return self.folder / "pointmaps" / source / f"{self.names[i]}.npz"


@dataclass
class Scene:
    """A fully loaded scene (small scenes, tests, tools); the dataset loads frames lazily instead."""

    cameras: SceneCameras
    images: list[np.ndarray]  # F x uint8 [H, W, 3]
    depth: list[np.ndarray] | None  # F x float32 [H, W]
    masks: list[np.ndarray] | None  # F x uint8 [H, W]
    point_maps: dict[str, tuple[list[np.ndarray], list[np.ndarray]]]  # source -> (xyz [h,w,3], conf [h,w])
    meta: dict

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
    overwrite: bool = False,
) -> Path:
    """Write one scene folder; it appears complete or not at all (temporary folder + rename).

    images: per frame a uint8 array [H, W, 3], a float array/tensor [3, H, W] in [0, 1] (the batch
        format), or a path to an existing png/jpg that is copied byte for byte (no re-encoding).
    K [F, 3, 3], c2w [F, 4, 4]: OpenCV pixel intrinsics and camera-to-world poses.
    depth: optional [F, H, W] z-depth (stored float16). masks: optional [F, H, W] uint8.
        Items of either may be zero-argument callables, so converters need not hold a whole
        sequence of full-resolution maps in memory.
    point_maps: optional {source: xyz [F, h, w, 3] or (xyz, conf [F, h, w])}, world frame.
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
        cameras = {
            "convention": "opencv", "pose": "c2w", "depth": "z",
            "frames": frames,
            "scale": 1.0, "scale_is_metric": bool(scale_is_metric),
            "depth_source": depth_source,
            "pointmap_sources": sorted(point_maps or {}),
        }
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
    )
    for source in cameras.pointmap_sources:
        for i in range(len(cameras)):
            if not cameras.pointmap_path(source, i).is_file():
                raise SceneFolderError(f"{path}: pointmap_sources lists {source!r} but "
                                       f"{cameras.pointmap_path(source, i)} is missing")
    return cameras


def read_image(path: Path, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Decode fully (a truncated file fails here, not in a DataLoader worker later) -> uint8 [H,W,3]."""
    try:
        with Image.open(path) as im:
            im.load()
            array = np.array(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as e:
        raise SceneFolderError(f"{path}: cannot decode image ({e})") from None
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
    try:
        with Image.open(path) as im:
            im.load()
            array = np.asarray(im.convert("L"))
    except (OSError, ValueError, SyntaxError) as e:
        raise SceneFolderError(f"{path}: cannot decode mask ({e})") from None
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
    return Scene(cams, images, depth, masks, point_maps, meta)


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


def validate_K(K, where: str) -> np.ndarray:
    K = np.asarray(K, dtype=np.float64)
    if K.shape != (3, 3):
        raise SceneFolderError(f"{where}: intrinsics must be 3x3, got shape {K.shape}")
    if not np.isfinite(K).all():
        raise SceneFolderError(f"{where}: intrinsics are not finite: {K.tolist()}")
    if K[0, 0] <= 0 or K[1, 1] <= 0 or K[1, 0] != 0 or not np.allclose(K[2], [0, 0, 1]):
        raise SceneFolderError(f"{where}: not a pinhole intrinsics matrix "
                               f"(need fx, fy > 0 and last row [0, 0, 1]): {K.tolist()}")
    return K


def validate_c2w(c2w, where: str) -> np.ndarray:
    c2w = np.asarray(c2w, dtype=np.float64)
    if c2w.shape != (4, 4):
        raise SceneFolderError(f"{where}: cam2world must be 4x4, got shape {c2w.shape}")
    if not np.isfinite(c2w).all():
        raise SceneFolderError(f"{where}: cam2world is not finite: {c2w.tolist()}")
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


# ----------------------------------------------------------------------------------------------
# Resizing with the matching intrinsics update


def crop_resize_matrix(in_hw: tuple[int, int], out_hw: tuple[int, int], mode: str) -> tuple[np.ndarray, tuple]:
    """Pixel map A (K' = A @ K) and crop box (y0, x0, h, w) for `center_crop` or `stretch`.

    With the pixel-centre convention a resize by s maps u to s (u + 0.5) - 0.5, not s u: the
    half-pixel term is what keeps a 3D point on the same image content after resizing.
    """
    (H, W), (oh, ow) = in_hw, out_hw
    if mode == "stretch":
        y0, x0, ch, cw = 0, 0, H, W
    elif mode == "center_crop":
        if W * oh > H * ow:  # too wide for the target aspect: crop columns
            ch, cw = H, max(1, round(H * ow / oh))
        else:
            ch, cw = max(1, round(W * oh / ow)), W
        y0, x0 = (H - ch) // 2, (W - cw) // 2
    else:
        raise ValueError(f"resize mode {mode!r} is not one of ('center_crop', 'stretch')")
    sx, sy = ow / cw, oh / ch
    crop = np.array([[1.0, 0, -x0], [0, 1, -y0], [0, 0, 1]])
    scale = np.array([[sx, 0, 0.5 * (sx - 1)], [0, sy, 0.5 * (sy - 1)], [0, 0, 1]])
    return scale @ crop, (y0, x0, ch, cw)


def _resample(t: torch.Tensor, box: tuple, out_hw: tuple[int, int], mode: str) -> torch.Tensor:
    """Crop `t [C, H, W]` to box and resize; `bilinear` antialiases, `nearest-exact` keeps samples."""
    y0, x0, ch, cw = box
    t = t[:, y0:y0 + ch, x0:x0 + cw]
    if tuple(t.shape[-2:]) == tuple(out_hw):
        return t
    if mode == "bilinear":
        return torch.nn.functional.interpolate(t[None], size=out_hw, mode="bilinear", align_corners=False,
                                               antialias=True)[0]
    return torch.nn.functional.interpolate(t[None], size=out_hw, mode="nearest-exact")[0]


# ----------------------------------------------------------------------------------------------
# Dataset


def rotation_angle_deg(R_a: np.ndarray, R_b: np.ndarray) -> np.ndarray:
    """Relative rotation angle between camera rotations (broadcasts over leading dims).

    For orbit cameras this equals the azimuth step whatever the elevation, which makes it the
    viewpoint-change measure shared with the synthetic set's `azimuth_step_deg` knob.
    """
    cos = (np.einsum("...ij,...ij->...", R_a, R_b) - 1.0) / 2.0  # trace(R_a^T R_b)
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


class SceneFolderDataset(torch.utils.data.Dataset):
    """Samples `num_views` frames per scene of a scene-folder dataset, references first.

    Frames are chosen as an increasing sequence whose consecutive index gaps are drawn from
    `frame_spacing = (min, max)` (the baseline knob for video datasets, as MVGenMaster does);
    `num_ref` of them, chosen at random, become the references and come first, each group in
    frame order. With `max_view_change_deg = (lo, hi)` a sample is redrawn (up to `max_tries`)
    until the largest relative rotation between any reference and any target lies in [lo, hi].
    Item `i` depends only on (seed, i), so runs and DataLoader workers agree.

    Items follow the batch format without the batch dimension: image [V,3,H,W] in [0,1],
    intrinsics [V,3,3], cam2world [V,4,4], depth [V,H,W] (if the scene has depth and `load_depth`),
    point_map [V,3,H,W] (if `point_map_source` is given), num_ref. `image_size` (int or (H, W))
    resizes every view with the matching K update, after a centre crop to the target aspect
    (`resize_mode="center_crop"`) or by stretching (`"stretch"`).
    """

    def __init__(
        self,
        root: str | Path,
        num_views: int,
        split: str = "train",
        num_ref: int = 1,
        frame_spacing: tuple[int, int] = (1, 1),
        max_view_change_deg: tuple[float, float] | None = None,
        image_size: int | tuple[int, int] | None = None,
        seed: int = 0,
        *,
        resize_mode: str = "center_crop",
        load_depth: bool = True,
        point_map_source: str | None = None,
        samples_per_scene: int = 1,
        max_tries: int = 100,
    ):
        self.root = Path(root)
        if not 1 <= num_ref < num_views:
            raise ValueError(f"num_ref must be in [1, num_views - 1] = [1, {num_views - 1}], got {num_ref}")
        lo, hi = (int(v) for v in frame_spacing)
        if not 1 <= lo <= hi:
            raise ValueError(f"frame_spacing must be (min, max) with 1 <= min <= max, got {frame_spacing}")
        if max_view_change_deg is not None and not 0 <= max_view_change_deg[0] <= max_view_change_deg[1]:
            raise ValueError(f"max_view_change_deg must be (lo, hi) with 0 <= lo <= hi, got {max_view_change_deg}")
        if resize_mode not in ("center_crop", "stretch"):
            raise ValueError(f"resize_mode {resize_mode!r} is not one of ('center_crop', 'stretch')")
        self.num_views, self.num_ref, self.frame_spacing = num_views, num_ref, (lo, hi)
        self.max_view_change_deg = max_view_change_deg
        if image_size is not None:
            image_size = (image_size, image_size) if isinstance(image_size, int) else image_size
            image_size = tuple(int(s) for s in image_size)
        self.image_size = image_size
        self.seed, self.resize_mode, self.load_depth = seed, resize_mode, load_depth
        self.point_map_source, self.samples_per_scene, self.max_tries = point_map_source, samples_per_scene, max_tries

        index = read_dataset_index(self.root)
        if split not in index["splits"]:
            raise SceneFolderError(f"{self.root / 'dataset.json'}: no split {split!r}; "
                                   f"available: {sorted(index['splits'])}")
        self.scene_ids = list(index["splits"][split])
        if not self.scene_ids:
            raise SceneFolderError(f"{self.root / 'dataset.json'}: split {split!r} is empty")
        self.cameras = [read_cameras(scene_dir(self.root, s)) for s in self.scene_ids]
        needed = (num_views - 1) * lo + 1
        for cams in self.cameras:
            if len(cams) < needed:
                raise SceneFolderError(f"{cams.folder / 'cameras.json'}: field 'frames' has {len(cams)} frames, "
                                       f"fewer than the {needed} needed for {num_views} views at spacing >= {lo}")
            if point_map_source is not None and point_map_source not in cams.pointmap_sources:
                raise SceneFolderError(f"{cams.folder / 'cameras.json'}: no point maps from {point_map_source!r} "
                                       f"(pointmap_sources = {cams.pointmap_sources})")

    def __len__(self) -> int:
        return len(self.scene_ids) * self.samples_per_scene

    def sample_frames(self, index: int) -> tuple[str, list[int]]:
        """(scene id, frame indices references first) of item `index`; deterministic in (seed, index)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        cams = self.cameras[index // self.samples_per_scene]
        rng = np.random.default_rng([self.seed, index])
        rotations = cams.c2w[:, :3, :3]
        for _ in range(self.max_tries):
            frames = self._draw_window(rng, len(cams))
            ref_pos = np.sort(rng.choice(self.num_views, self.num_ref, replace=False))
            refs = frames[ref_pos]
            targets = np.delete(frames, ref_pos)
            if self.max_view_change_deg is None:
                break
            change = rotation_angle_deg(rotations[refs][:, None], rotations[targets][None]).max()
            if self.max_view_change_deg[0] <= change <= self.max_view_change_deg[1]:
                break
        else:
            raise SceneFolderError(
                f"{cams.folder}: no sample of {self.num_views} views with frame spacing {self.frame_spacing} "
                f"has a max reference-target rotation within {self.max_view_change_deg} deg after "
                f"{self.max_tries} tries; widen the range or the spacing")
        return self.scene_ids[index // self.samples_per_scene], [int(f) for f in (*refs, *targets)]

    def _draw_window(self, rng: np.random.Generator, num_frames: int) -> np.ndarray:
        """Increasing frame indices whose gaps lie in frame_spacing and which fit in the scene."""
        lo, hi = self.frame_spacing
        gaps = []
        slack = num_frames - 1 - (self.num_views - 1) * lo  # >= 0, checked in __init__
        for _ in range(self.num_views - 1):
            gap = int(rng.integers(lo, min(hi, lo + slack) + 1))
            slack -= gap - lo
            gaps.append(gap)
        offsets = np.concatenate([[0], np.cumsum(gaps)]).astype(np.int64)
        start = int(rng.integers(0, num_frames - offsets[-1]))
        return start + offsets

    def __getitem__(self, index: int) -> dict:
        scene_id, frames = self.sample_frames(index)
        cams = self.cameras[index // self.samples_per_scene]
        views = [self._load_view(cams, f) for f in frames]
        sizes = {tuple(v["image"].shape[-2:]) for v in views}
        if len(sizes) > 1:
            raise SceneFolderError(f"{cams.folder}: frames {frames} have different sizes {sorted(sizes)}; "
                                   "set image_size to resize them to one size")
        item = {key: torch.stack([v[key] for v in views]) for key in views[0]}
        item["num_ref"] = self.num_ref
        return validate_batch(item, batched=False)

    def _load_view(self, cams: SceneCameras, i: int) -> dict[str, torch.Tensor]:
        hw = tuple(int(s) for s in cams.sizes[i])
        image = torch.from_numpy(read_image(cams.image_paths[i], hw)).permute(2, 0, 1).float() / 255.0  # [3, H, W]
        K = cams.K[i]
        view = {}
        depth = None
        if self.load_depth and cams.depth_paths is not None:
            depth = torch.from_numpy(read_depth(cams.depth_paths[i], hw))[None]  # [1, H, W]
        point_map = None
        if self.point_map_source is not None:
            xyz, _ = read_pointmap(cams.pointmap_path(self.point_map_source, i))
            point_map = torch.from_numpy(xyz).permute(2, 0, 1)  # [3, h, w]
            if tuple(point_map.shape[-2:]) != hw:  # point maps may come at the model's resolution
                point_map = _resample(point_map, (0, 0, *point_map.shape[-2:]), hw, "nearest-exact")
        if self.image_size is not None:
            A, box = crop_resize_matrix(hw, self.image_size, self.resize_mode)
            K = A @ K
            image = _resample(image, box, self.image_size, "bilinear").clamp(0, 1)
            if depth is not None:
                depth = _resample(depth, box, self.image_size, "nearest-exact")
            if point_map is not None:
                point_map = _resample(point_map, box, self.image_size, "nearest-exact")
        view["image"] = image
        view["intrinsics"] = torch.from_numpy(K).float()
        view["cam2world"] = torch.from_numpy(cams.c2w[i]).float()
        if depth is not None:
            view["depth"] = depth[0]
        if point_map is not None:
            view["point_map"] = point_map
        return view
