"""LLFF `poses_bounds.npy` -> scene folders (LLFF forward-facing scenes, MipNeRF360's copies).

Expected layout, for SRC itself or every folder below it that holds a poses_bounds.npy::

    <scene>/poses_bounds.npy     float [N, 17], one row per image
    <scene>/images/<name>        the N images; or --images DIR; or --downscale N: images_<N>/

The format (LLFF's README and its `imgs2poses.py`): each row is a 3x5 matrix, row-major, then two
depth bounds (near, far). The 3x5 matrix is [R | t | hwf]: R's columns are the camera's axes in
world coordinates in the order (down, right, backwards), t the camera centre (so [R | t] is
camera-to-world), hwf = (image height, width, focal length) in pixels of the full-size images the
poses were computed from. OpenCV's axes are (right, down, forward): columns (1, 0, -2).

Rows follow the images' names in plain string order (LLFF's `imgs2poses` sorts COLMAP's names
with `np.argsort`, and its loader lists the folder with `sorted`), so that is how rows and files
are paired; the frames are then stored in natural order (image2 before image10).

Intrinsics: focal hwf[2] and the principal point at the image centre ((W - 1)/2, (H - 1)/2 in our
convention, as LLFF's model assumes), rescaled to the size of the images found
(f' = s f, c' = s (c + 0.5) - 0.5) when they are a downsampled copy.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cameo_bench.data.converters.base import (
    ConvertedScene,
    ConvertOptions,
    check_resized_copy,
    image_hw,
    iter_files,
    list_images,
    natural_key,
    register_converter,
    rescale_K,
    resolve_images_dir,
)
from cameo_bench.data.scene_format import SceneFolderError, validate_c2w

POSES = "poses_bounds.npy"
LLFF_TO_CV = [1, 0, 2]  # OpenCV x, y, z = LLFF right, down, -backwards
LLFF_SIGN = np.array([1.0, 1.0, -1.0])


def _scenes(src: Path) -> list[tuple[str, Path]]:
    if (src / POSES).is_file():
        return [(src.resolve().name, src)]
    found = [(p.parent.relative_to(src).as_posix(), p.parent) for p in iter_files(src, POSES)]
    if not found:
        raise SceneFolderError(f"{src}: no {POSES} here or below")
    return found


def load_poses_bounds(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (c2w [N, 4, 4] OpenCV, hwf [N, 3], bounds [N, 2]) in the file's row order."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise SceneFolderError(f"{path}: cannot read array ({e})") from None
    if arr.ndim != 2 or arr.shape[1] != 17 or len(arr) == 0:
        raise SceneFolderError(f"{path}: expected an [N, 17] array (3x5 pose + 2 bounds per image), got {arr.shape}")
    if not np.isfinite(arr).all():
        rows = np.flatnonzero(~np.isfinite(arr).all(axis=1))
        raise SceneFolderError(f"{path}: rows {rows[:10].tolist()} are not finite")
    poses = arr[:, :15].reshape(-1, 3, 5).astype(np.float64)
    c2w = np.tile(np.eye(4), (len(arr), 1, 1))
    c2w[:, :3, :3] = poses[:, :, LLFF_TO_CV] * LLFF_SIGN  # columns: right, down, forward
    c2w[:, :3, 3] = poses[:, :, 3]
    for i in range(len(arr)):
        validate_c2w(c2w[i], f"{path}: row {i} (3x5 pose)")
    hwf = poses[:, :, 4]
    if (hwf <= 0).any():
        raise SceneFolderError(f"{path}: rows {np.flatnonzero((hwf <= 0).any(axis=1))[:10].tolist()} have a "
                               "non-positive height, width or focal length")
    return c2w, hwf, arr[:, 15:17].astype(np.float64)


@register_converter("llff", options=("images", "downscale"))
def iter_scenes(src: Path, options: ConvertOptions) -> Iterator[ConvertedScene]:
    for scene_id, scene in _scenes(src):
        yield convert_scene(scene_id, scene, options)


def convert_scene(scene_id: str, scene: Path, options: ConvertOptions) -> ConvertedScene:
    path = scene / POSES
    c2w, hwf, bounds = load_poses_bounds(path)
    folder = resolve_images_dir(scene, options.images) or scene / (
        f"images_{options.downscale}" if options.downscale else "images")
    files = sorted(list_images(folder), key=lambda p: p.name)  # LLFF's pairing order
    if len(files) != len(c2w):
        raise SceneFolderError(f"{path}: {len(c2w)} poses but {len(files)} images in {folder}")
    order = sorted(range(len(files)), key=lambda i: natural_key(files[i].name))
    Ks = []
    for i in order:
        H, W, f = hwf[i]
        hw = image_hw(files[i])
        K = np.array([[f, 0, (W - 1) / 2], [0, f, (H - 1) / 2], [0, 0, 1.0]])
        if hw != (round(H), round(W)):
            check_resized_copy(files[i], hw, (H, W))
            K = rescale_K(K, (H, W), hw)
        Ks.append(K)
    return ConvertedScene(
        scene_id=scene_id, images=[files[i] for i in order], K=np.stack(Ks), c2w=c2w[order],
        names=[f"{n:06d}" for n in range(len(files))],
        meta={"dataset": "llff", "images": [files[i].name for i in order],
              "bounds": bounds[order].tolist()},
        source=str(path),
    )
