"""The latent cache: each frame of a scene-folder dataset encoded by a VAE once, stored as safetensors, validated on every load.

Why: SD's VAE encoder costs more than a multi-view UNet step on the same frames, and a training run
visits each frame many times. So the posterior of every frame (mean and std, unscaled, float32) is
encoded once, either ahead of time (`cameo-bench data encode --vae FOLDER SCENES OUT`) or on first
use by a training run (`codec.cache = True`, the default for folder data), and training then reads
latents instead of images (evaluation still reads its images, to score them).

Layout, beside the dataset's `scenes/` folder by default (`<data.root>/latents`, or `codec.cache_dir`):

    <cache>/<vae id[:16]>_<H>x<W>_<resize mode>/<scene id>/<frame name>.safetensors
        tensors  mean, std [C, H / downsample, W / downsample] float32
        metadata format, vae (sha256 of the VAE's config + weights), image_size, resize_mode,
                 source (the image file), source_bytes, source_mtime_ns

The folder name keys the cache by what determines a latent: the VAE's identity, the resolution and
the crop (resize mode; with the frame's stored size it fixes the crop box). The metadata repeats the
key and records the image file's size and modification time, so an entry is checked on every load
without reading the image: a corrupt file (unreadable, wrong shape, non-finite), an entry of another
VAE/size/crop, or one whose image changed since is named in a warning and re-encoded, never used.
Writes go to a temporary file renamed into place, so a killed run or two ranks encoding the same
frame never leave a half-written entry.
"""
from __future__ import annotations

import copy
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from cameo_bench.data.scene_dataset import _resample, crop_resize_matrix
from cameo_bench.data.scene_format import SceneCameras, read_cameras, read_image, scene_dir
from cameo_bench.data.splits import all_scenes

FORMAT = "cameo_bench/latents-v1"


class LatentCacheError(ValueError):
    """A cache entry that must not be used; the message says why (corrupt or stale)."""


def frame_image(cams: SceneCameras, i: int, image_size: tuple[int, int] | None, resize_mode: str) -> torch.Tensor:
    """Frame i as `SceneFolderDataset` gives it: [3, H, W] in [0, 1], cropped and resized
    (tests/test_latent_cache.py checks that the two agree)."""
    hw = tuple(int(v) for v in cams.sizes[i])
    image = torch.from_numpy(read_image(cams.image_paths[i], hw)).permute(2, 0, 1).float() / 255.0  # [3, h0, w0]
    if image_size is None:
        return image
    _, box = crop_resize_matrix(hw, image_size, resize_mode)
    return _resample(image, box, image_size, "bilinear").clamp(0, 1)


def _source_stat(cams: SceneCameras, i: int) -> dict[str, str]:
    """The image file's name within its scene folder, size and modification time: what says it
    changed, without reading it (a copy of the dataset must keep mtimes: cp -p, rsync -a)."""
    path = cams.image_paths[i]
    st = os.stat(path)
    return {"source": path.relative_to(cams.folder).as_posix(), "source_bytes": str(st.st_size),
            "source_mtime_ns": str(st.st_mtime_ns)}


MAX_WARNINGS = 10  # per cache: then one line says that further rebuilt entries go unnamed


@dataclass
class LatentCache:
    """Cached posterior moments of one VAE at one resolution and crop, under `root`.

    `codec` is a `objectives.codecs.VaeCodec` (anything with `identity()`, `moments()`,
    `channels`, `downsample`, `encode_batch`).
    """

    root: Path  # the cache folder holding the key folders
    codec: object
    image_size: tuple[int, int]  # (H, W) of the images the latents encode
    resize_mode: str
    warned: int = 0

    @classmethod
    def for_codec(cls, root: str | Path, codec, dataset) -> "LatentCache":
        """The cache matching a `SceneFolderDataset`'s resolution and crop."""
        if dataset.image_size is None:
            raise ValueError("the latent cache needs a fixed image size (data.image_size)")
        return cls(Path(root), codec, tuple(dataset.image_size), dataset.resize_mode)

    @property
    def key(self) -> dict[str, str]:
        H, W = self.image_size
        return {"format": FORMAT, "vae": self.codec.identity(), "image_size": f"{H}x{W}",
                "resize_mode": self.resize_mode}

    @property
    def folder(self) -> Path:
        H, W = self.image_size
        return self.root / f"{self.codec.identity()[:16]}_{H}x{W}_{self.resize_mode}"

    def path(self, cams: SceneCameras, i: int) -> Path:
        return self.folder / cams.folder.name / f"{cams.names[i]}.safetensors"

    # ------------------------------------------------------------------ one entry
    def load(self, cams: SceneCameras, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) [C, h, w] of frame i; `LatentCacheError` if missing, corrupt or stale."""
        from safetensors import safe_open

        path = self.path(cams, i)
        if not path.exists():
            raise LatentCacheError("missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                mean, std = f.get_tensor("mean"), f.get_tensor("std")
        except Exception as err:  # noqa: BLE001 - any unreadable file is corrupt, whatever safetensors raised
            raise LatentCacheError(f"corrupt (unreadable: {type(err).__name__}: {err})") from None
        expected = {**self.key, **_source_stat(cams, i)}
        for name, value in expected.items():
            if meta.get(name) != value:
                raise LatentCacheError(f"stale ({name} is {meta.get(name)!r}, expected {value!r})")
        H, W = self.image_size
        shape = (self.codec.channels, H // self.codec.downsample, W // self.codec.downsample)
        for name, t in (("mean", mean), ("std", std)):
            if tuple(t.shape) != shape or not bool(torch.isfinite(t).all()):
                raise LatentCacheError(f"corrupt ({name} has shape {tuple(t.shape)}, expected {shape}, "
                                       f"or non-finite values)")
        return mean, std

    def store(self, cams: SceneCameras, i: int, mean: torch.Tensor, std: torch.Tensor) -> Path:
        from safetensors.torch import save_file

        path = self.path(cams, i)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({"mean": mean.detach().float().cpu().contiguous(), "std": std.detach().float().cpu().contiguous()},
                  str(tmp), metadata={**self.key, **_source_stat(cams, i)})
        os.replace(tmp, path)
        return path

    # ------------------------------------------------------------------ many frames
    def frames(self, cams: SceneCameras, indices: Sequence[int], *, quiet_missing: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(mean, std) [n, C, h, w] of frames `indices`, encoding (and storing) those not validly
        cached; also returns how many were encoded. A corrupt or stale entry is named in a
        warning; a missing one only when `quiet_missing` is False."""
        out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        todo = []
        for i in dict.fromkeys(int(i) for i in indices):
            try:
                out[i] = self.load(cams, i)
            except LatentCacheError as err:
                if str(err) != "missing" or not quiet_missing:
                    self._warn(f"latent cache entry {self.path(cams, i)} is {err}; re-encoding it")
                todo.append(i)
        for start in range(0, len(todo), self.codec.encode_batch):
            chunk = todo[start:start + self.codec.encode_batch]
            images = torch.stack([frame_image(cams, i, self.image_size, self.resize_mode) for i in chunk])
            mean, std = self.codec.moments(images.to(self.codec.device))  # [n, C, h, w] each
            for n, i in enumerate(chunk):
                self.store(cams, i, mean[n], std[n])
                out[i] = (mean[n].cpu(), std[n].cpu())
        mean = torch.stack([out[int(i)][0] for i in indices])
        std = torch.stack([out[int(i)][1] for i in indices])
        return mean, std, len(todo)

    def _warn(self, message: str) -> None:
        self.warned += 1
        if self.warned <= MAX_WARNINGS:
            warnings.warn(message, stacklevel=3)
        if self.warned == MAX_WARNINGS:
            warnings.warn(f"latent cache {self.folder}: {MAX_WARNINGS} entries rebuilt; further ones are "
                          "rebuilt without a warning each", stacklevel=3)

    def item_latents(self, cams: SceneCameras, frames: Sequence[int]) -> dict[str, torch.Tensor]:
        """The keys a training item gets: `latent [V, C, h, w]` in model space (the codec's scaled
        posterior mean) and, when the codec samples, `latent_std` (scaled) for one draw per use."""
        mean, std, _ = self.frames(cams, frames)
        out = {"latent": self.codec.scale(mean)}
        if getattr(self.codec, "sample", False):
            out["latent_std"] = std * self.codec.scaling_factor
        return out


def with_latent_cache(dataset, cache: LatentCache):
    """A copy of a `SceneFolderDataset` whose items carry cached `latent` (encoded on first use)
    instead of `image`: iterating it reads no image file once the cache is full."""
    if not hasattr(dataset, "latents"):
        raise TypeError(f"the latent cache needs a SceneFolderDataset (data.kind = 'folder'), got {type(dataset).__name__}")
    cached = copy.copy(dataset)
    cached.latents = cache.item_latents
    return cached


def encode_dataset(codec, scenes_root: str | Path, out: str | Path, image_size: tuple[int, int] | None,
                   resize_mode: str = "center_crop", progress: Callable[[str], None] | None = None) -> dict:
    """Fill the cache `out` with every frame of every scene of the dataset at `scenes_root`.

    Valid entries are kept (so an interrupted encode resumes), corrupt or stale ones re-encoded.
    Returns counts and the encode rate: {frames, encoded, cached, seconds, frames_per_s, folder}.
    """
    if image_size is None:
        raise ValueError("encode needs an image size (--image-size), the resolution the run trains at")
    cache = LatentCache(Path(out), codec, tuple(image_size), resize_mode)
    total = encoded = 0
    tic = time.perf_counter()
    for scene in all_scenes(scenes_root):
        cams = read_cameras(scene_dir(scenes_root, scene))
        _, _, n = cache.frames(cams, range(len(cams)))
        total += len(cams)
        encoded += n
        if progress is not None:
            progress(f"{scene}: {len(cams)} frames ({n} encoded)")
    seconds = time.perf_counter() - tic
    return {"frames": total, "encoded": encoded, "cached": total - encoded, "seconds": round(seconds, 3),
            "frames_per_s": round(encoded / seconds, 2) if encoded and seconds > 0 else None,
            "folder": str(cache.folder)}


def parse_size(text: str | int) -> tuple[int, int]:
    """`512` or `512x384` (H x W) -> (H, W)."""
    parts = str(text).lower().split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes, default=0) < 1:
        raise ValueError(f"image size {text!r}: give N or HxW with positive integers, e.g. 512 or 512x384")
    return (sizes[0], sizes[-1])


def encode_command(vae: str | Path, scenes: str | Path, out: str | Path, image_size: str | int,
                   resize_mode: str = "center_crop", *, batch: int = 16, device: str | None = None) -> int:
    """`cameo-bench data encode`: fill the cache, print what was done and the encode rate."""
    from cameo_bench.objectives.codecs import VaeCodec

    import sys

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        size = parse_size(image_size)
        codec = VaeCodec.from_folder(vae, encode_batch=batch).to(device)
    except (OSError, ValueError) as err:  # a bad --vae or --image-size: one line, not a traceback
        print(f"cameo-bench data encode: {err}", file=sys.stderr)
        return 2
    result = encode_dataset(codec, scenes, out, size, resize_mode, progress=print)
    rate = f", {result['frames_per_s']} frames/s on {device}" if result["frames_per_s"] else ""
    print(f"latent cache {result['folder']}: {result['frames']} frames, {result['encoded']} encoded, "
          f"{result['cached']} already cached{rate}")
    return 0
