"""COLMAP sparse reconstructions -> scene folders (phone captures, MipNeRF360, MVImgNet, ScanNet++ DSLR).

Expected layout, for SRC itself or for every folder below it that holds a model (scene id = its
path relative to SRC), text or binary, straight out of `colmap mapper`::

    <scene>/sparse/0/{cameras,images,points3D}.{bin,txt}   or <scene>/sparse/ or <scene>/ itself
    <scene>/images/<name>        the image files named in images.*; or <scene>/<name>; or --images DIR
    <scene>/images_<N>/<name>    with --downscale N: a downsampled copy, K rescaled to it

Conventions (colmap.github.io/format.html; readers in `colmap_model`): world-to-camera Hamilton
quaternion + translation, OpenCV axes; pixel coordinates put the centre of the top-left pixel at
(0.5, 0.5), ours at (0, 0), so cx, cy and every 2D observation move by -0.5.

Cameras: SIMPLE_PINHOLE and PINHOLE are kept as they are. SIMPLE_RADIAL, RADIAL, OPENCV and
FULL_OPENCV (COLMAP's default for a phone capture is SIMPLE_RADIAL) are undistorted here: the images
are resampled to a pinhole camera whose K is written out, and the 2D observations are moved by the
same model (see `undistort` for the formula and how the new K is chosen). A camera whose
distortion parameters are all 0 is kept as it is. The fisheye models are refused.

Frames are ordered by image name, digit runs as numbers (image2 before image10). The points3D
tracks are stored (points3d.npz + tracks/<frame>.npz): each image's 2D points that belong to a 3D
point, in stored-image pixels; observations that undistortion moves off the image are dropped.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np

import cameo_bench.data.converters.colmap_model as colmap_model
from cameo_bench.data.converters.base import (
    ConvertedScene,
    ConvertOptions,
    check_resized_copy,
    image_hw,
    natural_key,
    register_converter,
    resize_matrix,
    resolve_images_dir,
    rigid_from_w2c,
)
from cameo_bench.data.converters.undistort import UndistorterCache, inside, is_distorted
from cameo_bench.data.scene_format import SceneFolderError, SparseTracks

MODEL_DIRS = ("sparse/0", "sparse", ".")
PINHOLE_MODELS = ("SIMPLE_PINHOLE", "PINHOLE")
DISTORTED_MODELS = ("SIMPLE_RADIAL", "RADIAL", "OPENCV", "FULL_OPENCV")


def _model_dir(scene: Path) -> Path | None:
    for rel in MODEL_DIRS:
        if colmap_model.has_model(scene / rel):
            return scene / rel
    return None


def _scenes(src: Path) -> list[tuple[str, Path, Path]]:
    """(scene id, scene folder, model folder) for SRC or every model below it."""
    model = _model_dir(src)
    if model is not None:
        return [(src.resolve().name, src, model)]
    found = []
    for dirpath, dirnames, _ in os.walk(src):
        dirnames.sort(key=natural_key)
        here = Path(dirpath)
        if here == src:
            continue
        model = _model_dir(here)
        if model is not None:
            found.append((here.relative_to(src).as_posix(), here, model))
            dirnames[:] = []  # a scene's own sub-folders (sparse/, images/) are not scenes
    if not found:
        raise SceneFolderError(f"{src}: no COLMAP model (cameras + images .bin or .txt in "
                               f"{' or '.join(MODEL_DIRS)}) here or below")
    return found


def pinhole(cam: colmap_model.Camera) -> tuple[np.ndarray, np.ndarray]:
    """(K [3, 3] in COLMAP pixel coordinates, OpenCV distortion coefficients) of a camera."""
    p = cam.params
    if cam.model not in PINHOLE_MODELS + DISTORTED_MODELS:
        raise SceneFolderError(f"{cam.where}: camera {cam.id} uses model {cam.model}, which is not supported "
                               f"(supported: {list(PINHOLE_MODELS + DISTORTED_MODELS)}); undistort the images "
                               "first with `colmap image_undistorter`")
    if cam.model in ("SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL"):
        fx = fy = p[0]
        cx, cy = p[1], p[2]
        extra = p[3:]
    else:
        fx, fy, cx, cy = p[:4]
        extra = p[4:]
    if cam.model == "SIMPLE_RADIAL":  # k = k1
        coeffs = [extra[0], 0.0, 0.0, 0.0]
    elif cam.model == "RADIAL":  # k1 k2
        coeffs = [extra[0], extra[1], 0.0, 0.0]
    else:  # pinhole: none; OPENCV k1 k2 p1 p2, FULL_OPENCV k1 k2 p1 p2 k3 k4 k5 k6: OpenCV's own order
        coeffs = list(extra)
    if fx <= 0 or fy <= 0:
        raise SceneFolderError(f"{cam.where}: camera {cam.id} has focal lengths {fx}, {fy}; need > 0")
    return np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1.0]]), np.array(coeffs, dtype=np.float64)


def _image_dirs(scene: Path, model: Path, options: ConvertOptions) -> list[Path]:
    given = resolve_images_dir(scene, options.images)
    if given is not None:
        return [given]
    if options.downscale:
        return [scene / f"images_{options.downscale}"]
    return [scene / "images", scene, model]


def _find(name: str, dirs: list[Path]) -> Path | None:
    for d in dirs:
        if (d / name).is_file():
            return d / name
    return None


@register_converter("colmap", options=("images", "downscale"))
def iter_scenes(src: Path, options: ConvertOptions) -> Iterator[ConvertedScene]:
    for scene_id, scene, model_dir in _scenes(src):
        yield convert_model(scene_id, scene, model_dir, options)


def convert_model(scene_id: str, scene: Path, model_dir: Path, options: ConvertOptions) -> ConvertedScene:
    model = colmap_model.read_model(model_dir)
    dirs = _image_dirs(scene, model_dir, options)
    undistorters = UndistorterCache()
    has_points = model.point_ids is not None
    entries = sorted(model.images, key=lambda im: natural_key(im.name))
    images, Ks, c2ws, tracks, models = [], [], [], [], set()
    dropped, undistorted = 0, False
    for im in entries:
        if im.camera_id not in model.cameras:
            raise SceneFolderError(f"{im.where}: camera id {im.camera_id} is not in the cameras of {model_dir}")
        cam = model.cameras[im.camera_id]
        models.add(cam.model)
        path = _find(im.name, dirs)
        if path is None:
            raise SceneFolderError(f"{im.where}: image file {im.name} is in none of "
                                   f"{[str(d) for d in dirs]} (pass --images DIR)")
        K_colmap, coeffs = pinhole(cam)
        K = K_colmap.copy()
        K[:2, 2] -= 0.5  # COLMAP pixel centres are at +0.5
        ids, xy = np.zeros(0, np.int64), np.zeros((0, 2))
        if has_points:  # the triangulated observations, one per point
            keep = (im.point3d_ids >= 0) & np.isin(im.point3d_ids, model.point_ids)
            ids, first = np.unique(im.point3d_ids[keep], return_index=True)
            xy = im.xy[keep][first] - 0.5
        hw = image_hw(path)
        if hw != (cam.height, cam.width):
            if options.images is None and not options.downscale:
                raise SceneFolderError(f"{path}: size {hw[0]}x{hw[1]} (HxW) differs from camera {cam.id} "
                                       f"({cam.height}x{cam.width}) in {cam.where}; pass --downscale N or "
                                       "--images DIR if it is a resized copy")
            check_resized_copy(path, hw, (cam.height, cam.width))
            A = resize_matrix((cam.height, cam.width), hw)
            K = A @ K
            xy = xy * np.diag(A)[:2] + A[:2, 2]
        if is_distorted(coeffs):
            und = undistorters.get(K, coeffs, hw)
            images.append(partial(und.image, path))
            undistorted = True
            K = und.K_new
            xy = und.points(xy)
        else:
            images.append(path)
        Ks.append(K)
        c2ws.append(rigid_from_w2c(im.w2c[:3, :3], im.w2c[:3, 3]))
        if has_points:
            on = inside(xy, hw)
            dropped += int((~on).sum())
            tracks.append((ids[on], xy[on]))
    return ConvertedScene(
        scene_id=scene_id, images=images, K=np.stack(Ks), c2w=np.stack(c2ws),
        names=[f"{i:06d}" for i in range(len(images))],
        meta={"dataset": "colmap", "model_format": model.kind, "images": [e.name for e in entries],
              "camera_models": sorted(models), "undistorted": undistorted,
              "num_points3d": None if model.point_ids is None else int(len(model.point_ids)),
              "track_observations_dropped_off_image": dropped},
        source=str(model_dir),
        tracks=SparseTracks(model.point_ids, model.xyz, tracks) if has_points else None,
    )

