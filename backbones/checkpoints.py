"""Reading checkpoints for `create_backbone(..., init_from=PATH)`: files, folders, config merging, key checks.

One place reads every source a backbone initialises from (a diffusers model folder, a pipeline
folder's `unet/`, a single `.safetensors`/`.pt` state dict, a folder written by our own
`save_pretrained`), and one place words what goes wrong: a source of the wrong kind is named
with its file, what it looks like and the first missing/unexpected keys, so a VAE folder given
as a UNet or a DiT file given to the UNet fails in one readable line instead of a shape error
deep inside `load_state_dict`. The format-specific mappings live with their backbone's
initialiser (`backbones.init_sd_unet`, `backbones.init_dit`).
"""
from __future__ import annotations

import argparse
import inspect
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CheckpointMismatchError", "KINDS", "Source", "build", "check_keys", "from_source", "merge_init_config", "same_value",
    "read_source", "read_state_dict", "wrong_kind_error",
]

WEIGHT_NAMES = (  # what diffusers' save_pretrained writes, in the order it is looked for
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
)
SHOWN = 5  # keys listed per error


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit the backbone it was given to (wrong kind, keys, shapes)."""


@dataclass(frozen=True)
class Kind:
    """A checkpoint layout, recognised by a few keys every checkpoint of it has."""

    description: str
    backbone: str | None  # the backbone that initialises from it, if any
    signature: tuple[str, ...]
    prefixes: tuple[str, ...]  # top-level key prefixes of the layout


KINDS: dict[str, Kind] = {
    "sd_unet": Kind(
        "a diffusers UNet2DConditionModel (Stable-Diffusion UNet)", "mv_unet",
        ("conv_in.weight", "time_embedding.linear_1.weight", "conv_out.weight"),
        ("conv_in.", "time_embedding.", "down_blocks.", "mid_block.", "up_blocks.", "conv_norm_out.", "conv_out."),
    ),
    "dit": Kind(
        "a DiT checkpoint (facebookresearch/DiT layout)", "mv_dit",
        ("x_embedder.proj.weight", "t_embedder.mlp.0.weight", "final_layer.linear.weight"),
        ("x_embedder.", "t_embedder.", "y_embedder.", "pos_embed", "blocks.", "final_layer."),
    ),
    "vae": Kind(
        "a diffusers AutoencoderKL (a VAE, not a denoiser)", None,
        ("encoder.conv_in.weight", "decoder.conv_in.weight"),
        ("encoder.", "decoder.", "quant_conv.", "post_quant_conv."),
    ),
    "MultiViewUNet": Kind(
        "a mv_unet save_pretrained folder", "mv_unet",
        ("unet.conv_in.weight", "unet.time_embedding.linear_1.weight"), ("unet.", "camera_encoder."),
    ),
    "MultiViewDiT": Kind(
        "a mv_dit save_pretrained folder", "mv_dit",
        ("patch_embed.proj.weight", "t_embedder.linear_1.weight", "final_layer.linear.weight"),
        ("patch_embed.", "t_embedder.", "blocks.", "final_layer.", "pos_embedding", "view_embedding"),
    ),
}


@dataclass
class Source:
    """A checkpoint as read from disk: its tensors, and its config when it has one."""

    path: Path  # what the user gave
    weights_file: Path  # the file (or shard index) the tensors came from: what errors name
    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any] | None = None
    config_file: Path | None = None

    @property
    def class_name(self) -> str | None:
        return (self.config or {}).get("_class_name")

    def kind(self) -> str | None:
        """The `KINDS` entry whose signature keys are all present (None: no known layout)."""
        for name, kind in KINDS.items():
            if all(key in self.state_dict for key in kind.signature):
                return name
        return None


def read_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` file, a shard index, or a torch pickle (`.pt`, `.pth`, `.bin`,
    `.ckpt`, read with weights_only). A DiT training checkpoint (`{"model", "ema", "opt", "args"}`)
    yields its EMA weights, which DiT samples with, or its `model` weights without an EMA."""
    from safetensors.torch import load_file

    name = file.name
    if name.endswith(".safetensors"):
        return load_file(file)
    if name.endswith(".safetensors.index.json"):
        shards = sorted(set(json.loads(file.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(file.parent / shard).items()}
    if file.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        with torch.serialization.safe_globals([argparse.Namespace]):  # DiT's train.py saves its args
            obj = torch.load(file, map_location="cpu", weights_only=True)
        for key in ("ema", "model", "state_dict"):
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointMismatchError(f"{file}: not a state dict (name -> tensor), got {type(obj).__name__}")
        return obj
    raise CheckpointMismatchError(
        f"{file}: unknown checkpoint file type; expected .safetensors, .safetensors.index.json, .pt, .pth, .bin or .ckpt"
    )


def read_source(path: str | Path) -> Source:
    """Read a checkpoint file, or a model folder (config.json + diffusion_pytorch_model.*), or a
    pipeline folder (its `unet/` subfolder). Nothing is downloaded: the path must exist."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"init_from {path}: no such file or folder (checkpoints are read from local paths only)")
    if path.is_file():
        return Source(path, path, read_state_dict(path))
    folder = path
    if not (path / "config.json").is_file() and (path / "unet" / "config.json").is_file():
        folder = path / "unet"  # a pipeline folder: its denoiser
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"init_from {path}: no config.json here or in {path / 'unet'}")
    for weights in WEIGHT_NAMES:
        if (folder / weights).is_file():
            config = json.loads(config_file.read_text())
            return Source(path, folder / weights, read_state_dict(folder / weights), config, config_file)
    raise FileNotFoundError(f"init_from {folder}: no weights; looked for {', '.join(WEIGHT_NAMES)}")


def wrong_kind_error(source: Source, cls: type, expected: str) -> CheckpointMismatchError:
    """The error for a source that `cls` cannot initialise from: names the file, what it looks
    like (and which backbone reads it), and its first missing/unexpected keys for `expected`
    (a `KINDS` name, or "save_pretrained" for the class's own folders)."""
    own = KINDS.get(cls.__name__) or Kind(f"a {cls.__name__} save_pretrained folder", None, (), ())
    want = own if expected == "save_pretrained" else KINDS[expected]
    keys = list(source.state_dict)
    missing = [k for k in want.signature if k not in source.state_dict]
    unexpected = [k for k in keys if not k.startswith(want.prefixes)]
    found = source.kind()
    if found is not None:
        kind = KINDS[found]
        hint = f"it looks like {kind.description}" + (
            f"; backbone {kind.backbone!r} initialises from it" if kind.backbone else "")
    elif source.class_name:
        hint = f"its config.json names _class_name {source.class_name!r}"
    else:
        hint = "it matches no known layout"
    readable = f"{want.description} or {own.description}" if want is not own else own.description
    return CheckpointMismatchError(
        f"init_from {source.weights_file}: {cls.__name__} initialises from {readable}, but {hint}. "
        f"First missing keys: {missing[:SHOWN]}; first unexpected keys: {unexpected[:SHOWN]}"
        + (f" (+{len(unexpected) - SHOWN} more)" if len(unexpected) > SHOWN else "")
    )


def check_keys(file: Path, expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor],
               fresh_ok: tuple[str, ...] = ()) -> None:
    """Raise naming `file` unless `found` has exactly the keys and shapes of `expected` (keys
    ending in one of `fresh_ok` may be missing: they keep their initialisation)."""
    missing = sorted(k for k in expected if k not in found and not k.endswith(fresh_ok))
    unexpected = sorted(k for k in found if k not in expected)
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"init_from {file}: keys do not match the model built from it: "
            f"first missing keys {missing[:SHOWN]} ({len(missing)} in all), "
            f"first unexpected keys {unexpected[:SHOWN]} ({len(unexpected)} in all)"
        )
    shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
              for k, v in found.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if shapes:
        raise CheckpointMismatchError(f"init_from {file}: shape mismatches {shapes[:SHOWN]} ({len(shapes)} in all)")


def same_value(a: Any, b: Any) -> bool:
    """Config values equal up to JSON's tuple -> list."""
    norm = lambda x: [norm(i) for i in x] if isinstance(x, (list, tuple)) else x  # noqa: E731
    return norm(a) == norm(b)


def merge_init_config(cls: type, source: dict[str, Any], where: str, defaults: dict[str, Any],
                      defaults_from: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The constructor keywords of an initialised model: `source` (the architecture, plus the
    backbone's from-source defaults), then the multi-view fields of `defaults` (a preset), then
    `overrides`. An override of a non-multi-view field must equal the source's value (the
    engine passes e.g. `in_channels` from the codec): anything else would not be the source."""
    allowed = cls.init_overridable
    params = inspect.signature(cls.__init__).parameters
    config = dict(source)
    config.update({k: v for k, v in defaults.items() if k in allowed})
    for key, value in overrides.items():
        if key in allowed:
            config[key] = value
            continue
        current = config[key] if key in config else getattr(params.get(key), "default", None)
        if not same_value(value, current):
            raise CheckpointMismatchError(
                f"init_from {where}: override {key}={value!r} conflicts with the source ({key}={current!r}); "
                f"the architecture comes from the checkpoint, overrides may only set {sorted(allowed)}"
            )
    return config


def build(cls: type, config: dict[str, Any], where: str, defaults: dict[str, Any], defaults_from: str):
    """`cls(**config)`, with a constructor error reworded to name the source and what a preset
    contributed (e.g. the `tiny` preset's 3 per-level entries against a 4-level SD UNet)."""
    try:
        return cls(**config)
    except (ValueError, TypeError) as err:
        from_preset = sorted(k for k in defaults if k in cls.init_overridable)
        extra = (f"; {defaults_from or 'the preset'} contributed {from_preset}: pass them as overrides "
                 "or give no preset") if from_preset else ""
        raise CheckpointMismatchError(f"init_from {where}: cannot build {cls.__name__} from it: {err}{extra}") from err


def from_source(cls: type, path: str | Path, defaults: dict[str, Any], defaults_from: str,
                overrides: dict[str, Any]):
    """`MultiViewBackbone.from_source`: our own save_pretrained folder, else the class's
    `_from_foreign` reader."""
    path = Path(path).expanduser()
    config_file = path / "config.json"
    if path.is_dir() and config_file.is_file():
        if json.loads(config_file.read_text()).get("_class_name") == cls.__name__:
            return _load_saved(cls, read_source(path), overrides)
    return cls._from_foreign(path, defaults, defaults_from, overrides)


def _load_saved(cls: type, source: Source, overrides: dict[str, Any]):
    """A folder our `save_pretrained` wrote: its config as saved (a preset's defaults do not
    apply: the saved multi-view parts are trained ones), overrides of the multi-view fields, and
    a strict load (an override that adds or drops parameters fails naming them)."""
    params = list(inspect.signature(cls.__init__).parameters)[1:]
    saved = {k: v for k, v in (source.config or {}).items() if not k.startswith("_")}
    unknown = sorted(set(saved) - set(params))
    if unknown:
        raise CheckpointMismatchError(f"init_from {source.config_file}: unknown config fields {unknown} for {cls.__name__}")
    config = merge_init_config(cls, saved, str(source.config_file), {}, "", overrides)
    model = build(cls, config, str(source.config_file), {}, "")
    expected = model.state_dict()
    fresh = cls.fresh_keys_ok(config, saved)
    check_keys(source.weights_file, expected, source.state_dict, fresh_ok=fresh)
    if fresh and any(k.endswith(fresh) for k in expected if k not in source.state_dict):
        warn_not_source(cls, f"{sorted(fresh)} start fresh")
    model.load_state_dict(source.state_dict, strict=False)  # strictness checked above
    return model


def warn_not_source(cls: type, why: str) -> None:
    warnings.warn(
        f"{cls.__name__} initialised from a checkpoint: {why}, so the model no longer starts as "
        "the source model (design.md, Backbones: pretrained init)", UserWarning, stacklevel=4,
    )
