"""nerfstudio / instant-ngp `transforms.json` -> scene folders (also NeRF-synthetic and DL3DV).

Expected layout: SRC is a transforms.json, a folder holding one, or a tree of such folders (scene
id = the folder's path relative to SRC; a folder named `nerfstudio`, DL3DV's layout, gives its
parent's name)::

    <scene>/transforms.json                  frames[].file_path relative to the json's folder
    <scene>/images/..., images_<N>/...        with --downscale N: nerfstudio's downsampled copies
    # NeRF-synthetic: one scene per split file, scene id <scene>/<split>, in that split:
    <scene>/transforms_{train,val,test}.json  file_path without suffix, e.g. "./train/r_0"

Fields (nerfstudio's and instant-ngp's own documentation): intrinsics at the top level and/or per
frame (a frame's value wins): `fl_x`, `fl_y`, `cx`, `cy`, `w`, `h`, or `camera_angle_x`
(horizontal field of view, radians; `camera_angle_y` likewise), `camera_model` (default OPENCV),
distortion `k1 k2 k3 p1 p2` (OpenCV's radial-tangential model, see `undistort`); `k4` and the
fisheye / equirectangular models are refused. Each frame's `transform_matrix` is a camera-to-world
matrix with OpenGL camera axes (x right, y up, z backwards); OpenCV's flip y and z:
c2w_cv = c2w_gl @ diag(1, -1, -1, 1). The world frame is kept as it is (nerfstudio's
`applied_transform` is recorded in meta.json, not undone).

Pixel convention: nerfstudio and instant-ngp cast the ray of pixel (i, j) through (i + 0.5,
j + 0.5), so a given cx, cy has the centre of the top-left pixel at (0.5, 0.5): ours = cx - 0.5.
Without cx/cy (NeRF-synthetic) the principal point is the image centre, ((w - 1)/2, (h - 1)/2) in
our convention. When the image found differs from `w` x `h` (a downsampled copy), K is rescaled
to it (f' = s f, c' = s (c + 0.5) - 0.5). Distorted cameras are undistorted (`undistort`).

Frames listed whose image file is missing: an error listing them, or dropped with
`--skip-missing` (recorded in meta.json). Frames are ordered by file path, digit runs as numbers.

Images with an alpha channel (NeRF-synthetic's RGBA renders) are composited over white, the
background NeRF-synthetic results are reported on, and the alpha channel is stored as the mask.
"""
from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np

from cameo_bench.data.converters.base import (
    ConvertedScene,
    ConvertOptions,
    check_resized_copy,
    find_image,
    image_hw,
    iter_files,
    natural_key,
    register_converter,
    rescale_K,
)
from cameo_bench.data.converters.undistort import UndistorterCache, is_distorted
from cameo_bench.data.scene_format import EncodedImage, SceneFolderError, validate_c2w

GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])
SPLIT_FILES = {"transforms_train.json": "train", "transforms_val.json": "val", "transforms_test.json": "test"}
PERSPECTIVE_MODELS = ("OPENCV", "PINHOLE", "SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL")
INTRINSIC_KEYS = ("fl_x", "fl_y", "cx", "cy", "w", "h", "camera_angle_x", "camera_angle_y",
                  "k1", "k2", "k3", "k4", "p1", "p2", "camera_model")
MAX_LISTED = 10


def _scene_id(folder: Path, src: Path) -> str:
    """The folder's path relative to SRC (SRC's own name for SRC itself); DL3DV's <hash>/nerfstudio/ is <hash>."""
    folder, src = folder.resolve(), src.resolve()
    if folder.name == "nerfstudio":
        folder = folder.parent
    return folder.relative_to(src).as_posix() if src in folder.parents else folder.name


def _jsons(src: Path) -> list[tuple[str, Path, str | None]]:
    """(scene id, json, split or None) for SRC or every transforms*.json below it."""
    paths = [src] if src.is_file() else [p for p in iter_files(src, "transforms*.json")
                                         if p.name == "transforms.json" or p.name in SPLIT_FILES]
    if not paths:
        raise SceneFolderError(f"{src}: no transforms.json (or transforms_train/val/test.json) here or below")
    root = src.parent if src.is_file() else src
    found = []
    for path in paths:
        scene, split = _scene_id(path.parent, root), SPLIT_FILES.get(path.name)
        found.append((f"{scene}/{split}" if split else scene, path, split))
    return found


def _number(d: dict, key: str, where: str) -> float | None:
    if key not in d or d[key] is None:
        return None
    try:
        value = float(d[key])
    except (TypeError, ValueError):
        raise SceneFolderError(f"{where}: field {key!r} must be a number, got {d[key]!r}") from None
    if not math.isfinite(value):
        raise SceneFolderError(f"{where}: field {key!r} is not finite")
    return value


def camera(fields: dict, hw_found: tuple[int, int], where: str) -> tuple[np.ndarray, np.ndarray]:
    """(K [3, 3] for the image found, in our pixel convention; OpenCV coefficients k1 k2 p1 p2 k3)."""
    model = str(fields.get("camera_model", "OPENCV")).upper()
    if model not in PERSPECTIVE_MODELS:
        raise SceneFolderError(f"{where}: field 'camera_model' is {model!r}; supported: {list(PERSPECTIVE_MODELS)} "
                               "(fisheye and panoramic cameras are not converted)")
    get = {k: _number(fields, k, where) for k in INTRINSIC_KEYS if k != "camera_model"}
    w = get["w"] if get["w"] is not None else hw_found[1]
    h = get["h"] if get["h"] is not None else hw_found[0]
    fx, fy = get["fl_x"], get["fl_y"]
    if fx is None and get["camera_angle_x"] is not None:
        fx = 0.5 * w / math.tan(0.5 * get["camera_angle_x"])
    if fy is None and get["camera_angle_y"] is not None:
        fy = 0.5 * h / math.tan(0.5 * get["camera_angle_y"])
    if fx is None and fy is None:
        raise SceneFolderError(f"{where}: no focal length (need 'fl_x'/'fl_y' or 'camera_angle_x')")
    fx, fy = fx if fx is not None else fy, fy if fy is not None else fx
    if fx <= 0 or fy <= 0:
        raise SceneFolderError(f"{where}: focal lengths {fx}, {fy} must be > 0")
    cx = get["cx"] - 0.5 if get["cx"] is not None else (w - 1) / 2  # ray through pixel centre i + 0.5
    cy = get["cy"] - 0.5 if get["cy"] is not None else (h - 1) / 2
    if get["k4"]:
        raise SceneFolderError(f"{where}: field 'k4' = {get['k4']} is not supported (OPENCV k1 k2 k3 p1 p2 only)")
    coeffs = np.array([get[k] or 0.0 for k in ("k1", "k2", "p1", "p2", "k3")])
    K = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1.0]])
    if (round(h), round(w)) != hw_found:
        K = rescale_K(K, (h, w), hw_found)
    return K, coeffs


def _load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SceneFolderError(f"{path}: cannot parse JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("frames"), list) or not data["frames"]:
        raise SceneFolderError(f"{path}: field 'frames' must be a non-empty list")
    return data


def _has_alpha(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info)
    except (OSError, ValueError) as e:
        raise SceneFolderError(f"{path}: cannot open image ({e})") from None


def _over_white(path: Path) -> tuple[EncodedImage, np.ndarray]:
    """(RGB composited over white as PNG, alpha uint8 [H, W])."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            rgba = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0  # [H, W, 4]
    except (OSError, ValueError, SyntaxError) as e:
        raise SceneFolderError(f"{path}: cannot decode image ({e})") from None
    alpha = rgba[..., 3:]
    rgb = np.rint(255.0 * (rgba[..., :3] * alpha + (1.0 - alpha))).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
    return (EncodedImage(buf.getvalue(), origin=f"{path} (over white)", hw=rgb.shape[:2]),
            np.rint(255.0 * alpha[..., 0]).astype(np.uint8))


def _image_path(folder: Path, file_path: str, downscale: int | None) -> Path | None:
    rel = Path(file_path)
    if downscale:  # nerfstudio: images_N/<file name>
        rel = Path(f"images_{downscale}") / rel.name
    path = folder / rel
    if path.is_file():
        return path
    return find_image(path) if not path.suffix else None


@register_converter("nerfstudio", options=("skip_missing", "downscale"))
def iter_scenes(src: Path, options: ConvertOptions) -> Iterator[ConvertedScene]:
    for scene_id, path, split in _jsons(src):
        yield convert_json(scene_id, path, split, options)


def convert_json(scene_id: str, path: Path, split: str | None, options: ConvertOptions) -> ConvertedScene:
    data = _load(path)
    shared = {k: data[k] for k in INTRINSIC_KEYS if k in data}
    found, missing = [], []
    for i, frame in enumerate(data["frames"]):
        where = f"{path}: frames[{i}]"
        if not isinstance(frame, dict) or "file_path" not in frame or "transform_matrix" not in frame:
            raise SceneFolderError(f"{where}: needs fields 'file_path' and 'transform_matrix'")
        image = _image_path(path.parent, str(frame["file_path"]), options.downscale)
        if image is None:
            missing.append(f"frames[{i}].file_path {frame['file_path']!r}")
        else:
            found.append((i, frame, image))
    if missing and not options.skip_missing:
        listed = "; ".join(missing[:MAX_LISTED]) + (f"; and {len(missing) - MAX_LISTED} more"
                                                    if len(missing) > MAX_LISTED else "")
        raise SceneFolderError(f"{path}: {len(missing)} listed image files do not exist"
                               f"{' (images_' + str(options.downscale) + ')' if options.downscale else ''}: "
                               f"{listed}; pass --skip-missing to drop them")
    if not found:
        raise SceneFolderError(f"{path}: none of the {len(data['frames'])} listed image files exists")
    found.sort(key=lambda item: natural_key(str(item[1]["file_path"])))
    undistorters = UndistorterCache()
    alpha = all(_has_alpha(image) for _, _, image in found)
    images, masks, Ks, c2ws, undistorted = [], [], [], [], False
    for i, frame, image in found:
        where = f"{path}: frames[{i}]"
        hw = image_hw(image)
        fields = {**shared, **{k: frame[k] for k in INTRINSIC_KEYS if k in frame}}
        if fields.get("w") is not None and fields.get("h") is not None:
            check_resized_copy(image, hw, (float(fields["h"]), float(fields["w"])))
        K, coeffs = camera(fields, hw, where)
        try:
            gl = np.asarray(frame["transform_matrix"], dtype=np.float64)
        except (TypeError, ValueError):
            raise SceneFolderError(f"{where}.transform_matrix: not a 4x4 matrix of numbers") from None
        if gl.shape == (3, 4):
            gl = np.vstack([gl, [0, 0, 0, 1]])
        c2w = validate_c2w(gl, f"{where}.transform_matrix") @ GL_TO_CV
        if is_distorted(coeffs):
            if alpha:
                raise SceneFolderError(f"{where}: images with alpha and lens distortion are not supported")
            und = undistorters.get(K, coeffs, hw)
            images.append(partial(und.image, image))
            K, undistorted = und.K_new, True
        elif alpha:
            images.append(partial(lambda p: _over_white(p)[0], image))
            masks.append(partial(lambda p: _over_white(p)[1], image))
        else:
            images.append(image)
        Ks.append(K)
        c2ws.append(c2w)
    meta = {"dataset": "nerfstudio", "transforms": path.name,
            "file_paths": [str(f["file_path"]) for _, f, _ in found], "undistorted": undistorted,
            "skipped_missing": missing, "alpha_over_white": alpha}
    if "applied_transform" in data:
        meta["applied_transform"] = data["applied_transform"]
    return ConvertedScene(scene_id=scene_id, images=images, K=np.stack(Ks), c2w=np.stack(c2ws),
                          names=[f"{i:06d}" for i in range(len(images))], meta=meta, split=split,
                          masks=masks if alpha else None, source=str(path))
