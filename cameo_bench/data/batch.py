"""The batch format every loader produces and everything downstream reads: its checks, collation, device moves.

A batch is a plain dict of tensors (see design.md, Conventions):

    image      [B, V, 3, H, W]  float in [0, 1]
    intrinsics [B, V, 3, 3]     float, pixels of the stored image
    cam2world  [B, V, 4, 4]     float, OpenCV axes, rigid
    depth      [B, V, H, W]     float z-depth, 0 or non-finite = invalid      (optional)
    point_map  [B, V, 3, H, W]  float world-frame points                      (optional)
    sparse_depth [B, V, H, W]   float z of the view's SfM points, 0 = no point (optional)
    track_ids  [B, V, M]        long SfM point id per observation, -1 = padding (optional, with track_uv)
    track_uv   [B, V, M, 2]     float its pixel position in this (resized) view
    match_image [B, V, 3, h, w] float in [0, 1], the same crop at another size, for SIFT (optional)
    num_ref    int              views [0, num_ref) are references, 1 <= num_ref < V
    latent     [B, V, C, h, w]  float model-space latents (`data.latents` cache)  (optional)

A batch from the latent cache carries `latent` instead of `image` (training reads no image);
its H, W are then those of its image-sized keys (`depth`, ...), which must agree.

Dataset items are the same dict without the B dimension. Checking happens once, at the loader
boundary, so that a wrong shape fails with the key's name instead of deep inside a model.
Other keys are allowed and passed through untouched.
"""
from __future__ import annotations

import numbers
from typing import Any, Mapping, Sequence

import torch

__all__ = ["BatchFormatError", "REQUIRED_KEYS", "OPTIONAL_KEYS", "validate_batch", "collate", "batch_to"]

REQUIRED_KEYS = ("image", "intrinsics", "cam2world", "num_ref")
OPTIONAL_KEYS = ("depth", "point_map", "sparse_depth", "track_ids", "track_uv", "match_image")
# Keys whose items differ in length (dimension 1 of an item, M observations): collate pads them.
PADDED_KEYS = {"track_ids": -1, "track_uv": 0.0}

# Per-view layouts after the (B, V) prefix; strings are sizes taken from `image`.
_LAYOUTS: dict[str, tuple[int | str, ...]] = {
    "image": (3, "H", "W"),
    "intrinsics": (3, 3),
    "cam2world": (4, 4),
    "depth": ("H", "W"),
    "point_map": (3, "H", "W"),
    "sparse_depth": ("H", "W"),
}

# Colour values a hair outside [0, 1] come from float round-off in resizing/conversion; anything
# beyond this is a real bug (e.g. images in [0, 255] or [-1, 1]).
_IMAGE_TOLERANCE = 1e-4


class BatchFormatError(ValueError):
    """A batch or dataset item does not follow the batch format."""


def _expected_shape(key: str, prefix: dict[str, int], sizes: dict[str, int]) -> list[str]:
    dims = [f"{name}={size}" for name, size in prefix.items()]
    dims += [f"{d}={sizes[d]}" if isinstance(d, str) else str(d) for d in _LAYOUTS[key]]
    return dims


def _check_shape(key: str, tensor: Any, prefix: dict[str, int], sizes: dict[str, int]) -> None:
    expected = _expected_shape(key, prefix, sizes)
    if not isinstance(tensor, torch.Tensor):
        raise BatchFormatError(
            f"batch[{key!r}]: expected a tensor of shape [{', '.join(expected)}], got {type(tensor).__name__}"
        )
    want = tuple(prefix.values()) + tuple(sizes[d] if isinstance(d, str) else d for d in _LAYOUTS[key])
    if tuple(tensor.shape) != want:
        raise BatchFormatError(
            f"batch[{key!r}]: expected shape [{', '.join(expected)}], got {list(tensor.shape)}"
        )
    if not tensor.is_floating_point():
        raise BatchFormatError(f"batch[{key!r}]: expected a floating-point tensor, got {tensor.dtype}")


def _check_sparse_keys(batch: Mapping[str, Any], prefix: dict[str, int]) -> None:
    """track_ids [*, M] long with track_uv [*, M, 2] float (M free); match_image [*, 3, h, w] float."""
    lead = tuple(prefix.values())
    dims = ", ".join(f"{k}={v}" for k, v in prefix.items())
    if ("track_ids" in batch) != ("track_uv" in batch):
        raise BatchFormatError(f"batch has {'track_ids' if 'track_ids' in batch else 'track_uv'} without "
                               f"{'track_uv' if 'track_ids' in batch else 'track_ids'}; they come together")
    if "track_ids" in batch:
        ids, uv = batch["track_ids"], batch["track_uv"]
        if not isinstance(ids, torch.Tensor) or ids.ndim != len(lead) + 1 or tuple(ids.shape[:-1]) != lead \
                or ids.dtype != torch.long:
            got = f"{ids.dtype} {list(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise BatchFormatError(f"batch['track_ids']: expected a long tensor [{dims}, M], got {got}")
        want = (*ids.shape, 2)
        if not isinstance(uv, torch.Tensor) or tuple(uv.shape) != want or not uv.is_floating_point():
            got = f"{uv.dtype} {list(uv.shape)}" if isinstance(uv, torch.Tensor) else type(uv).__name__
            raise BatchFormatError(f"batch['track_uv']: expected a float tensor {list(want)} (like track_ids "
                                   f"plus 2), got {got}")
    if "match_image" in batch:
        m = batch["match_image"]
        if not isinstance(m, torch.Tensor) or m.ndim != len(lead) + 3 or tuple(m.shape[:len(lead) + 1]) != (*lead, 3) \
                or not m.is_floating_point():
            got = f"{m.dtype} {list(m.shape)}" if isinstance(m, torch.Tensor) else type(m).__name__
            raise BatchFormatError(f"batch['match_image']: expected a float tensor [{dims}, 3, h, w], got {got}")


def validate_batch(batch: Mapping[str, Any], *, batched: bool = True) -> Mapping[str, Any]:
    """Raise `BatchFormatError` naming the key, the expected and the actual shape on any violation.

    `batched=False` checks a single dataset item (no B dimension). Returns the batch unchanged so
    that loaders can write `return validate_batch(collate(items))`.
    """
    if not isinstance(batch, Mapping):
        raise BatchFormatError(f"a batch must be a dict of tensors, got {type(batch).__name__}")
    latent_only = "image" not in batch and "latent" in batch  # the latent cache's training items
    missing = [k for k in REQUIRED_KEYS if k not in batch and not (k == "image" and latent_only)]
    if missing:
        raise BatchFormatError(f"batch is missing required key(s) {missing}; it has {sorted(batch)}")

    image = batch["latent" if latent_only else "image"]
    lead = 2 if batched else 1
    layout = "[B, V, 3, H, W]" if batched else "[V, 3, H, W]"
    if latent_only:
        if not isinstance(image, torch.Tensor) or image.ndim != lead + 3:
            got = list(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise BatchFormatError(f"batch['latent']: expected shape {layout.replace('3, H, W', 'C, h, w')}, got {got}")
    elif not isinstance(image, torch.Tensor) or image.ndim != lead + 3 or image.shape[lead] != 3:
        got = list(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise BatchFormatError(f"batch['image']: expected shape {layout}, got {got}")
    H, W = image.shape[-2:]
    if latent_only:  # image-sized keys must agree with each other, not with the latent
        sized = [batch[k] for k in _LAYOUTS if k in batch and _LAYOUTS[k][-2:] == ("H", "W")]
        H, W = sized[0].shape[-2:] if sized and isinstance(sized[0], torch.Tensor) else (H, W)
    prefix = {"B": image.shape[0], "V": image.shape[1]} if batched else {"V": image.shape[0]}
    sizes = {"H": H, "W": W}
    num_views = prefix["V"]

    for key in _LAYOUTS:
        if key in batch or (key not in OPTIONAL_KEYS and not (key == "image" and latent_only)):
            _check_shape(key, batch[key], prefix, sizes)
    _check_sparse_keys(batch, prefix)

    if not latent_only and image.numel():
        lo, hi = image.min().item(), image.max().item()
        if not (lo >= -_IMAGE_TOLERANCE and hi <= 1 + _IMAGE_TOLERANCE):  # also catches NaN
            raise BatchFormatError(f"batch['image']: values must lie in [0, 1], got range [{lo:.4g}, {hi:.4g}]")
    for key in ("intrinsics", "cam2world"):
        if not bool(torch.isfinite(batch[key]).all()):
            raise BatchFormatError(f"batch[{key!r}]: contains non-finite values")

    num_ref = batch["num_ref"]
    if isinstance(num_ref, torch.Tensor) and num_ref.ndim == 0 and not num_ref.is_floating_point():
        num_ref = num_ref.item()
    if isinstance(num_ref, bool) or not isinstance(num_ref, numbers.Integral):
        raise BatchFormatError(f"batch['num_ref']: expected an int, got {type(batch['num_ref']).__name__}")
    if not 1 <= num_ref < num_views:
        raise BatchFormatError(
            f"batch['num_ref']: expected 1 <= num_ref < V={num_views} (at least one reference and one "
            f"target view), got {num_ref}"
        )
    return batch


def collate(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack dataset items into a batch; usable as a DataLoader `collate_fn`.

    `num_ref` stays a plain int (the default collate would turn it into a tensor), so every item must
    agree on it. Non-tensor extras become lists.
    """
    if len(items) == 0:
        raise BatchFormatError("collate: got no items")
    keys = set(items[0])
    for n, item in enumerate(items):
        if set(item) != keys:
            raise BatchFormatError(
                f"collate: item {n} has keys {sorted(item)}, item 0 has {sorted(keys)}"
            )
    num_refs = sorted({int(item["num_ref"]) for item in items}) if "num_ref" in keys else []
    if len(num_refs) > 1:
        raise BatchFormatError(f"collate: items disagree on num_ref ({num_refs}); a batch has one value")

    batch: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if key == "num_ref":
            batch[key] = num_refs[0]
        elif key in PADDED_KEYS and isinstance(values[0], torch.Tensor):
            batch[key] = _pad_stack(values, PADDED_KEYS[key])
        elif isinstance(values[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise BatchFormatError(
                    f"collate: batch[{key!r}] has different shapes across items: {sorted(shapes)}"
                )
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch


def _pad_stack(values: Sequence[torch.Tensor], fill) -> torch.Tensor:
    """Stack items [V, M_n, ...] padded along M to the largest M_n with `fill`."""
    M = max(v.shape[1] for v in values)
    out = values[0].new_full((len(values), values[0].shape[0], M, *values[0].shape[2:]), fill)
    for n, v in enumerate(values):
        if v.shape[0] != out.shape[1] or v.shape[2:] != out.shape[3:]:
            raise BatchFormatError(f"collate: item {n} has shape {list(v.shape)}, item 0 {list(values[0].shape)} "
                                   "(only dimension 1, the number of observations, may differ)")
        out[n, :, :v.shape[1]] = v
    return out


def batch_to(batch: Mapping[str, Any], device: torch.device | str, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Move every tensor of a batch to `device` (and floating tensors to `dtype` if given)."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, dtype=dtype if (dtype is not None and value.is_floating_point()) else None)
        out[key] = value
    return out
