"""RealEstate10K / ACID in pixelSplat's `.torch` chunk format -> scene folders (one scene per key).

Expected layout (what pixelSplat's and MVSplat's preprocessing writes)::

    SRC/train/000000.torch, SRC/train/000001.torch, ...   (+ index.json: key -> chunk file, unused)
    SRC/test/000000.torch, ...
    # or SRC a folder of chunks, or a single chunk file

A chunk is `torch.save` of a list of dicts, one per clip (pixelSplat src/dataset/dataset_re10k.py):

    key         str, the clip id (the scene id here; unique across chunks)
    url         str, the YouTube URL
    timestamps  int64 [T]
    cameras     float [T, 18]: fx fy cx cy (normalised by the image width / height), two unused
                numbers, then the 3x4 world-to-camera matrix row-major, OpenCV axes
    images      T uint8 tensors, each the bytes of an encoded JPEG frame

The split is the name of the chunk's folder when it is one of train / test / val, otherwise the
`--split` given. Frames are copied as the JPEG bytes (no re-encoding). K follows pixelSplat's
pixel convention (see `re10k.normalised_K`); c2w = inverse(w2c); scale is SLAM's, not metric.
Chunks are read with `torch.load(weights_only=True)`: plain lists, dicts, strings and tensors.
"""
from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cameo_bench.data.converters.base import (
    ConvertedScene,
    ConvertOptions,
    iter_files,
    register_converter,
    rigid_from_w2c,
)
from cameo_bench.data.converters.re10k import normalised_K
from cameo_bench.data.scene_format import EncodedImage, SceneFolderError, validate_c2w

SPLITS = ("train", "test", "val")
FIELDS = ("key", "url", "timestamps", "cameras", "images")


def _chunks(src: Path) -> list[Path]:
    chunks = [src] if src.is_file() else list(iter_files(src, "*.torch"))
    if not chunks:
        raise SceneFolderError(f"{src}: no pixelSplat chunks (*.torch) here or below")
    return chunks


def load_chunk(path: Path) -> list[dict]:
    import torch

    try:
        chunk = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types (pickle, zip, weights-only refusals)
        raise SceneFolderError(f"{path}: cannot load as a pixelSplat chunk ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(chunk, list):
        raise SceneFolderError(f"{path}: expected a list of clip dicts, got {type(chunk).__name__}")
    return chunk


def _jpeg_hw(data: bytes, where: str) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.height, im.width
    except (OSError, ValueError) as e:
        raise SceneFolderError(f"{where}: not an encoded image ({e})") from None


def convert_clip(clip, path: Path, n: int, split: str | None) -> ConvertedScene:
    where = f"{path}: [{n}]"
    if not isinstance(clip, dict) or (missing := [f for f in FIELDS if f not in clip]):
        raise SceneFolderError(f"{where}: a clip needs fields {list(FIELDS)}"
                               + (f"; missing {missing}" if isinstance(clip, dict) else ""))
    key = str(clip["key"])
    where = f"{path}: [{n}] key {key!r}"
    cameras = np.asarray(clip["cameras"], dtype=np.float64)
    timestamps = np.asarray(clip["timestamps"]).reshape(-1)
    frames = list(clip["images"])
    if cameras.ndim != 2 or cameras.shape[1] != 18:
        raise SceneFolderError(f"{where}: field 'cameras' must be [T, 18], got {list(cameras.shape)}")
    if not len(cameras) == len(timestamps) == len(frames) or len(frames) == 0:
        raise SceneFolderError(f"{where}: fields 'cameras', 'timestamps', 'images' must have the same non-zero "
                               f"length, got {len(cameras)}, {len(timestamps)}, {len(frames)}")
    if not np.isfinite(cameras).all():
        rows = np.flatnonzero(~np.isfinite(cameras).all(axis=1))[:10].tolist()
        raise SceneFolderError(f"{where}: field 'cameras' rows {rows} are not finite")
    images, Ks, c2ws = [], [], []
    for t, frame in enumerate(frames):
        data = np.asarray(frame, dtype=np.uint8).tobytes()
        image_where = f"{where}: images[{t}]"
        fx, fy, cx, cy = cameras[t, :4]
        if fx <= 0 or fy <= 0:
            raise SceneFolderError(f"{where}: cameras[{t}] focal lengths must be > 0, got {fx}, {fy}")
        Ks.append(normalised_K(fx, fy, cx, cy, _jpeg_hw(data, image_where)))
        w2c = np.eye(4)
        w2c[:3] = cameras[t, 6:].reshape(3, 4)
        validate_c2w(w2c, f"{where}: cameras[{t}] (w2c)")
        c2ws.append(rigid_from_w2c(w2c[:3, :3], w2c[:3, 3]))
        images.append(EncodedImage(data, image_where))
    return ConvertedScene(
        scene_id=key, images=images, K=np.stack(Ks), c2w=np.stack(c2ws),
        names=[f"{i:06d}" for i in range(len(images))],
        meta={"dataset": "realestate10k", "url": str(clip["url"]), "timestamps": timestamps.tolist(),
              "chunk": path.name},
        split=split, source=f"{path} [{n}]",
    )


@register_converter("re10k_chunks")
def iter_scenes(src: Path, options: ConvertOptions) -> Iterator[ConvertedScene]:
    seen: dict[str, str] = {}
    for path in _chunks(src):
        split = path.parent.name if path.parent.name in SPLITS else None
        for n, clip in enumerate(load_chunk(path)):
            scene = convert_clip(clip, path, n, split)
            if scene.scene_id in seen:
                raise SceneFolderError(f"{path}: [{n}] key {scene.scene_id!r} is also in {seen[scene.scene_id]}")
            seen[scene.scene_id] = f"{path} [{n}]"
            yield scene
