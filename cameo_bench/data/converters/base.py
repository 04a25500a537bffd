"""What every converter shares: the scene it yields, the registry, `convert`, and small file parsers.

Kept out of the package `__init__` so that converter modules import this module, never the package
that imports them (the package only collects them; tests/test_import_graph.py checks the rule).

A converter is a function `(src: Path, options: ConvertOptions) -> Iterator[ConvertedScene]`
registered under its `--format` name together with the options it understands; `convert` refuses
an option the format does not use rather than ignoring it.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from cameo_bench.data.scene_format import DatasetWriter, SceneFolderError, SparseTracks
from cameo_bench.registry import Registry


@dataclass
class ConvertedScene:
    """One scene in the project convention (OpenCV axes, c2w, pixel K with integer pixel centres).

    images: per frame a source path (copied without re-encoding), an `EncodedImage`, an array, or a
    zero-argument callable returning one of these (undistortion runs while the scene is written).
    """

    scene_id: str
    images: list
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
    tracks: SparseTracks | None = None


@dataclass(frozen=True)
class ConvertOptions:
    """Options of `cameo-bench data convert` that only some formats use (see `register_converter`).

    images: folder holding the images, if not where the format keeps them (relative paths are
        looked up in each scene folder first). skip_missing: drop listed frames whose image file is
        missing instead of failing. downscale: read the format's downsampled copy (`images_N`).
    """

    images: str | None = None
    skip_missing: bool = False
    downscale: int | None = None

    def given(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) != f.default]


Converter = Callable[[Path, ConvertOptions], Iterator[ConvertedScene]]


@dataclass(frozen=True)
class ConverterEntry:
    fn: Converter
    options: tuple[str, ...] = field(default=())


CONVERTERS: Registry[ConverterEntry] = Registry("converter")


def register_converter(name: str, options: tuple[str, ...] = ()) -> Callable[[Converter], Converter]:
    """Decorator: register a converter under the `--format` name with the `ConvertOptions` it reads;
    a second registration of a name raises."""
    valid = [f.name for f in fields(ConvertOptions)]
    if unknown := sorted(set(options) - set(valid)):
        raise ValueError(f"converter {name!r}: unknown options {unknown}; valid: {valid}")

    def decorator(fn: Converter) -> Converter:
        CONVERTERS.register(name, ConverterEntry(fn, tuple(options)), origin=f"{fn.__module__}.{fn.__qualname__}")
        return fn

    return decorator


def list_converters() -> list[str]:
    return CONVERTERS.list()


def get_converter(name: str) -> Converter:
    """The converter of `--format name`; `UnknownNameError` (a ValueError) lists the valid ones."""
    return CONVERTERS.get(name).fn


def convert(fmt: str, src: str | Path, out: str | Path, split: str = "train", overwrite: bool = False,
            name: str | None = None, options: ConvertOptions | None = None) -> dict[str, list[str]]:
    """Convert `src` (layout of `fmt`) into a scene-folder dataset at `out`; returns the splits.

    Everything is written into a temporary folder renamed into place at the end (`DatasetWriter`),
    so a failure leaves nothing at `out`.
    """
    entry = CONVERTERS.get(fmt)
    options = options or ConvertOptions()
    if unused := [o for o in options.given() if o not in entry.options]:
        flags = ", ".join("--" + o.replace("_", "-") for o in unused)
        users = sorted(n for n in list_converters() if set(unused) <= set(CONVERTERS.get(n).options))
        raise SceneFolderError(f"{flags} does not apply to --format {fmt}"
                               + (f" (it applies to: {', '.join(users)})" if users else ""))
    src = Path(src)
    if not src.exists():
        raise SceneFolderError(f"{src}: source does not exist")
    with DatasetWriter(out, name=name, overwrite=overwrite) as writer:
        for scene in entry.fn(src, options):
            meta = {"source_format": fmt, "source_path": str(scene.source or src), **scene.meta}
            try:
                writer.add(scene.scene_id, scene.split or split, scene.images, scene.K, scene.c2w,
                           depth=scene.depth, meta=meta, masks=scene.masks, names=scene.names,
                           depth_source=scene.depth_source, scale_is_metric=scene.scale_is_metric,
                           tracks=scene.tracks)
            except SceneFolderError as e:
                raise SceneFolderError(f"{fmt} scene {scene.scene_id!r} from {scene.source or src}: {e}") from None
        return dict(writer.splits)


# ----------------------------------------------------------------------------------------------
# Shared parsers


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".PNG", ".JPG", ".JPEG")


def natural_key(name: str) -> tuple:
    """Sort key putting 'image2' before 'image10' (digit runs compare as numbers); ties by the name."""
    parts = re.split(r"(\d+)", name)
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p.lower()) for p in parts if p), name


def find_image(stem: Path) -> Path | None:
    """`stem` plus the first existing image suffix (frames are often png or jpg)."""
    for suffix in IMAGE_SUFFIXES:
        path = stem.with_name(stem.name + suffix)
        if path.is_file():
            return path
    return None


def list_images(folder: Path) -> list[Path]:
    """The png/jpg files of a folder, natural order."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix in IMAGE_SUFFIXES),
                  key=lambda p: natural_key(p.name))


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


def resize_matrix(from_hw: tuple[int, int], to_hw: tuple[int, int]) -> np.ndarray:
    """Pixel map A [3, 3] of an image resized from `from_hw` to `to_hw` (a downsampled copy): K' = A K.

    With the pixel centre of the top-left pixel at (0, 0), a resize by s maps u to s (u + 0.5) - 0.5:
    f' = s f, c' = s (c + 0.5) - 0.5, per axis; 2D points move the same way.
    """
    sy, sx = to_hw[0] / from_hw[0], to_hw[1] / from_hw[1]
    return np.array([[sx, 0, 0.5 * (sx - 1)], [0, sy, 0.5 * (sy - 1)], [0, 0, 1]])


def rescale_K(K: np.ndarray, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> np.ndarray:
    """K of a camera whose image is resized from `from_hw` to `to_hw` (see `resize_matrix`)."""
    return resize_matrix(from_hw, to_hw) @ K


def check_resized_copy(path: Path, hw: tuple[int, int], full: tuple[int, int]) -> None:
    """A resized copy keeps the aspect ratio up to rounding each side to whole pixels."""
    s = hw[1] / full[1]
    if abs(hw[0] - s * full[0]) > 1.0:
        raise SceneFolderError(f"{path}: size {hw[0]}x{hw[1]} (HxW) is not a resized copy of "
                               f"{full[0]}x{full[1]} (the aspect ratio differs)")


def resolve_images_dir(scene: Path, images: str | None) -> Path | None:
    """`--images DIR`: relative to the scene folder if it exists there, else as given (None: not set)."""
    if images is None:
        return None
    candidate = scene / images
    return candidate if candidate.is_dir() or Path(images).is_absolute() else Path(images)


def iter_files(src: Path, pattern: str) -> Iterator[Path]:
    """Files matching `pattern` in `src` and below, in natural path order."""
    yield from sorted(src.rglob(pattern), key=lambda p: natural_key(p.relative_to(src).as_posix()))
