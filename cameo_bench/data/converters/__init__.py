"""Converters from real multi-view datasets to scene folders (notes/data.md §1.2, §1.4).

Each converter reads one foreign layout and yields `ConvertedScene`s that are already in the
project convention (OpenCV axes, camera-to-world, pixel K with integer pixel centres, z-depth):
foreign conventions are undone here, once, and nowhere else. `convert` writes them through a
`DatasetWriter`, so a conversion that fails leaves nothing at the output path.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cameo_bench.data.scene_format import DatasetWriter, SceneFolderError
from cameo_bench.registry import Registry


@dataclass
class ConvertedScene:
    """One scene in the project convention; images are source files, copied without re-encoding."""

    scene_id: str
    images: list[Path]
    K: np.ndarray  # [F, 3, 3]
    c2w: np.ndarray  # [F, 4, 4]
    names: list[str]
    meta: dict
    depth: list | None = None  # per frame an array [H, W] or a zero-argument loader of one
    masks: list | None = None
    depth_source: str = "none"
    scale_is_metric: bool = False
    split: str | None = None  # None: the split given to `convert`
    source: str = ""  # file the cameras came from, named in errors


Converter = Callable[[Path], Iterator[ConvertedScene]]
CONVERTERS: Registry[Converter] = Registry("converter")


def register_converter(name: str) -> Callable[[Converter], Converter]:
    """Decorator: register a converter under the `--format` name; a second one of a name raises."""
    return CONVERTERS.decorator(name)


def list_converters() -> list[str]:
    return CONVERTERS.list()


def get_converter(name: str) -> Converter:
    """The converter of `--format name`; `UnknownNameError` (a ValueError) lists the valid ones."""
    return CONVERTERS.get(name)


def convert(fmt: str, src: str | Path, out: str | Path, split: str = "train", overwrite: bool = False,
            name: str | None = None) -> dict[str, list[str]]:
    """Convert `src` (layout of `fmt`) into a scene-folder dataset at `out`; returns the splits."""
    converter = get_converter(fmt)
    src = Path(src)
    if not src.exists():
        raise SceneFolderError(f"{src}: source does not exist")
    with DatasetWriter(out, name=name, overwrite=overwrite) as writer:
        for scene in converter(src):
            meta = {"source_format": fmt, "source_path": str(scene.source or src), **scene.meta}
            try:
                writer.add(scene.scene_id, scene.split or split, scene.images, scene.K, scene.c2w,
                           depth=scene.depth, meta=meta, masks=scene.masks, names=scene.names,
                           depth_source=scene.depth_source, scale_is_metric=scene.scale_is_metric)
            except SceneFolderError as e:
                raise SceneFolderError(f"{fmt} scene {scene.scene_id!r} from {scene.source or src}: {e}") from None
        return dict(writer.splits)


def find_image(stem: Path) -> Path | None:
    """`stem` plus the first existing image suffix (frames are often png or jpg)."""
    for suffix in (".png", ".jpg", ".jpeg", ".PNG", ".JPG", ".JPEG"):
        path = stem.with_name(stem.name + suffix)
        if path.is_file():
            return path
    return None


def image_hw(path: Path) -> tuple[int, int]:
    """Size from the header only; the writer decodes every image fully later."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.height, im.width
    except (OSError, ValueError) as e:
        raise SceneFolderError(f"{path}: cannot open image ({e})") from None


def rigid_from_w2c(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """c2w [4, 4] from a world-to-camera rotation and translation (exact inverse of a rigid map)."""
    c2w = np.eye(4)
    c2w[:3, :3] = R.T
    c2w[:3, 3] = -R.T @ t
    return c2w


# Importing the modules registers the converters.
from cameo_bench.data.converters import co3dv2, colmap, re10k  # noqa: E402,F401
