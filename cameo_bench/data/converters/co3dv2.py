"""CO3Dv2 frame annotations -> scene folders (one scene per sequence).

Expected layout (the official release)::

    SRC/<category>/frame_annotations.jgz     gzipped JSON list of FrameAnnotation
    SRC/<category>/<sequence>/{images,depths,depth_masks,masks}/...
    # SRC may also be a single category folder.

Annotation paths are relative to SRC (the dataset root), e.g. "apple/110_13051_23361/images/
frame000001.jpg".

PyTorch3D conventions undone here (pytorch3d.org/docs/cameras; facebookresearch/co3d
`co3d/dataset/data_types.py`):
* extrinsics are row-vector, X_cam = X_world @ R + T, with camera axes +X left, +Y up, +Z
  forward. OpenCV flips x and y: R_cv = diag(-1, -1, 1) R^T, t_cv = diag(-1, -1, 1) T.
* intrinsics are NDC: x_ndc = f_x X/Z + p_x (same for y). `ndc_isotropic`: the shorter image side
  spans [-1, 1], s = min(H, W)/2 for both axes; legacy `ndc_norm_image_bounds`: x spans [-1, 1]
  over the width and y over the height (s_x = W/2, s_y = H/2). NDC +-1 lies on the outer pixel
  *edges* (PyTorch3D renders with align_corners=False; its screen space puts (0, 0) at the corner of
  the top-left pixel), so in OpenCV pixel-centre coordinates u = W/2 - s x_ndc - 0.5, i.e.
  fx = s f_x, cx = W/2 - s p_x - 0.5. This is half a pixel away from PyTorch3D's own
  `opencv_from_cameras_projection`, which omits the 0.5 (pytorch3d issue #1543), and from DUSt3R's
  preprocessing, which follows it.
* depth: a 16-bit PNG whose bits are a float16, times `scale_adjustment`; z-depth (PyTorch3D +Z
  is the optical axis); invalid where the depth mask is 0.
"""
from __future__ import annotations

import gzip
import json
from collections import defaultdict
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from cameo_bench.data.converters.base import (
    ConvertedScene,
    ConvertOptions,
    image_hw,
    register_converter,
    rigid_from_w2c,
)
from cameo_bench.data.scene_format import SceneFolderError, validate_c2w

ANNOTATIONS = "frame_annotations.jgz"
FLIP_XY = np.diag([-1.0, -1.0, 1.0])


def _categories(src: Path) -> tuple[Path, list[Path]]:
    """(dataset root that annotation paths are relative to, category folders)."""
    if (src / ANNOTATIONS).is_file():
        return src.parent, [src]
    cats = sorted(p for p in src.iterdir() if (p / ANNOTATIONS).is_file()) if src.is_dir() else []
    if not cats:
        raise SceneFolderError(f"{src}: no {ANNOTATIONS} here or in its category folders")
    return src, cats


def load_annotations(path: Path) -> list[dict]:
    try:
        with gzip.open(path, "rt") as f:
            frames = json.load(f)
    except (OSError, ValueError, EOFError) as e:
        raise SceneFolderError(f"{path}: cannot read gzipped JSON ({e})") from None
    if not isinstance(frames, list):
        raise SceneFolderError(f"{path}: expected a JSON list of frame annotations")
    return frames


def opencv_camera(viewpoint: dict, hw: tuple[int, int], where: str) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch3D NDC viewpoint -> (K [3, 3] OpenCV pixels, c2w [4, 4] OpenCV)."""
    try:
        R = np.asarray(viewpoint["R"], dtype=np.float64)
        T = np.asarray(viewpoint["T"], dtype=np.float64)
        f = np.asarray(viewpoint["focal_length"], dtype=np.float64)
        p = np.asarray(viewpoint["principal_point"], dtype=np.float64)
    except KeyError as e:
        raise SceneFolderError(f"{where}.viewpoint: missing field {e.args[0]!r}") from None
    if R.shape != (3, 3) or T.shape != (3,) or f.shape != (2,) or p.shape != (2,):
        raise SceneFolderError(f"{where}.viewpoint: expected R 3x3, T 3, focal_length 2, principal_point 2; "
                               f"got {R.shape}, {T.shape}, {f.shape}, {p.shape}")
    # CO3D's dataclass default for annotations written before the field existed.
    fmt = viewpoint.get("intrinsics_format", "ndc_norm_image_bounds")
    H, W = hw
    if fmt == "ndc_isotropic":
        sx = sy = min(H, W) / 2.0
    elif fmt == "ndc_norm_image_bounds":
        sx, sy = W / 2.0, H / 2.0
    else:
        raise SceneFolderError(f"{where}.viewpoint.intrinsics_format: unknown {fmt!r} "
                               "(expected 'ndc_isotropic' or 'ndc_norm_image_bounds')")
    K = np.array([[f[0] * sx, 0, W / 2.0 - p[0] * sx - 0.5],
                  [0, f[1] * sy, H / 2.0 - p[1] * sy - 0.5],
                  [0, 0, 1]])
    R_cv = FLIP_XY @ R.T  # world -> OpenCV camera, column-vector form
    t_cv = FLIP_XY @ T
    w2c = np.eye(4)
    w2c[:3, :3], w2c[:3, 3] = R_cv, t_cv
    validate_c2w(w2c, f"{where}.viewpoint (R, T)")
    return K, rigid_from_w2c(R_cv, t_cv)


def _load_depth(root: Path, ann: dict, hw: tuple[int, int], where: str) -> np.ndarray:
    path = root / ann["path"]
    try:
        with Image.open(path) as im:
            raw = np.array(im, dtype=np.uint16)  # [H, W], the float16 bits
    except (OSError, ValueError) as e:
        raise SceneFolderError(f"{path} ({where}.depth.path): cannot read depth PNG ({e})") from None
    if raw.shape != tuple(hw):
        raise SceneFolderError(f"{path} ({where}.depth.path): depth is {raw.shape}, image is {tuple(hw)}")
    depth = raw.view(np.float16).astype(np.float32) * float(ann.get("scale_adjustment", 1.0))
    if ann.get("mask_path"):
        mask_path = root / ann["mask_path"]
        try:
            with Image.open(mask_path) as im:
                mask = np.asarray(im.convert("L")) > 0
        except (OSError, ValueError) as e:
            raise SceneFolderError(f"{mask_path} ({where}.depth.mask_path): cannot read mask ({e})") from None
        if mask.shape != tuple(hw):
            raise SceneFolderError(f"{mask_path} ({where}.depth.mask_path): mask is {mask.shape}, "
                                   f"image is {tuple(hw)}")
        depth = np.where(mask, depth, 0.0)
    return np.where(np.isfinite(depth) & (depth > 0), depth, 0.0).astype(np.float32)


def _load_mask(path: Path, hw: tuple[int, int], where: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            mask = np.asarray(im.convert("L"))
    except (OSError, ValueError) as e:
        raise SceneFolderError(f"{path} ({where}.mask.path): cannot read mask ({e})") from None
    if mask.shape != tuple(hw):
        raise SceneFolderError(f"{path} ({where}.mask.path): mask is {mask.shape}, image is {tuple(hw)}")
    return mask


@register_converter("co3dv2")
def iter_scenes(src: Path, options: ConvertOptions) -> Iterator[ConvertedScene]:
    root, categories = _categories(src)
    for cat in categories:
        ann_path = cat / ANNOTATIONS
        sequences: dict[str, list[tuple[int, dict]]] = defaultdict(list)
        for idx, frame in enumerate(load_annotations(ann_path)):
            try:
                sequences[str(frame["sequence_name"])].append((idx, frame))
            except (KeyError, TypeError):
                raise SceneFolderError(f"{ann_path}[{idx}]: missing field 'sequence_name'") from None
        for seq in sorted(sequences):
            frames = sorted(sequences[seq], key=lambda item: int(item[1].get("frame_number", item[0])))
            images, Ks, c2ws, depths, masks, numbers = [], [], [], [], [], []
            for idx, frame in frames:
                where = f"{ann_path}[{idx}]"
                try:
                    image = root / frame["image"]["path"]
                    hw = tuple(int(v) for v in frame["image"]["size"])  # [H, W]
                    viewpoint = frame["viewpoint"]
                except (KeyError, TypeError) as e:
                    raise SceneFolderError(f"{where}: missing field {e}") from None
                if not image.is_file():
                    raise SceneFolderError(f"{where}.image.path: file {image} does not exist")
                if image_hw(image) != hw:
                    raise SceneFolderError(f"{image}: size {image_hw(image)} differs from {where}.image.size {hw}")
                K, c2w = opencv_camera(viewpoint, hw, where)
                images.append(image)
                Ks.append(K)
                c2ws.append(c2w)
                numbers.append(frame.get("frame_number", idx))
                # loaded lazily, while the scene is written
                depth_ann, mask_ann = frame.get("depth"), frame.get("mask")
                depths.append(partial(_load_depth, root, depth_ann, hw, where)
                              if depth_ann and depth_ann.get("path") else None)
                masks.append(partial(_load_mask, root / mask_ann["path"], hw, where)
                             if mask_ann and mask_ann.get("path") else None)
            has_depth = all(d is not None for d in depths)
            yield ConvertedScene(
                scene_id=f"{cat.name}/{seq}", images=images, K=np.stack(Ks), c2w=np.stack(c2ws),
                names=[f"{i:06d}" for i in range(len(images))],
                meta={"dataset": "co3dv2", "category": cat.name, "sequence_name": seq,
                      "frame_numbers": numbers, "images": [str(p.relative_to(root)) for p in images]},
                depth=depths if has_depth else None,
                masks=masks if all(m is not None for m in masks) else None,
                depth_source="mvs" if has_depth else "none",
                source=str(ann_path),
            )
