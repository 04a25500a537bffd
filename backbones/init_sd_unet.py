"""Initialising `mv_unet` from a diffusers Stable-Diffusion UNet folder: config mapping, checks, weight copy.

The architecture is read from the folder's config.json, so no preset has to match a checkpoint:
channels, levels, heads, norm groups, linear projection and `upcast_attention` map onto
`MultiViewUNet`'s constructor, and every other UNet2DConditionModel field (time embedding, mid
block type, transformer depth, class/addition embeddings, ...) must equal what `MultiViewUNet`
builds, or the error names the field: a UNet this backbone cannot reproduce is refused, never
loaded approximately. Weight names are SD's own (the inner `UNet2DConditionModel` keeps them);
only the text cross-attention (attn2/norm2) is dropped.
"""
from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from backbones.checkpoints import (
    CheckpointMismatchError,
    build,
    check_keys,
    merge_init_config,
    read_source,
    same_value,
    warn_not_source,
    wrong_kind_error,
)

TEXT_ATTENTION = re.compile(r"\.transformer_blocks\.\d+\.(attn2|norm2)\.")  # resnets have a norm2 too
# source fields not compared with the inner UNet: mapped onto our own config, or meaningless here
_NOT_COMPARED = {
    "sample_size",  # any size runs
    "cross_attention_dim",  # the text cross-attention is dropped
    "attention_head_dim", "num_attention_heads",  # mapped to num_heads
    "in_channels", "out_channels", "dropout",  # mapped (the inner conv_in also takes concat/patch channels)
}


def sd_unet_architecture(config: dict[str, Any]) -> dict[str, Any]:
    """`MultiViewUNet` keywords for an SD UNet config (missing fields: diffusers' defaults), plus
    the from-source defaults of the multi-view parts: 3D attention below the top level (CAT3D*:
    per-view at the full-resolution level), camera encoder added after conv_in, no q/k norm."""
    full = {**_unet_defaults(), **config}
    channels = tuple(full["block_out_channels"])
    heads = full["num_attention_heads"] or full["attention_head_dim"]  # diffusers' own rule
    return dict(
        in_channels=full["in_channels"],
        out_channels=full["out_channels"],
        block_out_channels=channels,
        layers_per_block=full["layers_per_block"],
        num_heads=tuple(heads) if isinstance(heads, (list, tuple)) else heads,
        attention_levels=tuple(str(kind).startswith("CrossAttn") for kind in full["down_block_types"]),
        norm_num_groups=full["norm_num_groups"],
        use_linear_projection=bool(full["use_linear_projection"]),
        upcast_attention=bool(full["upcast_attention"]),
        dropout=full["dropout"],
        cross_view_levels=(False,) + (True,) * (len(channels) - 1),
        qk_norm=False,
    )


def _unet_defaults() -> dict[str, Any]:
    params = list(inspect.signature(UNet2DConditionModel.__init__).parameters.values())[1:]
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def check_reproducible(config: dict[str, Any], built: dict[str, Any], where: Path) -> None:
    """Every source field we do not map must be what the model built: else it is another UNet."""
    for key, value in config.items():
        if key.startswith("_") or key in _NOT_COMPARED or key not in built:
            continue  # unknown keys come from other diffusers versions, as diffusers itself ignores them
        if not same_value(value, built[key]):
            raise CheckpointMismatchError(
                f"init_from {where}: {key} = {value!r} is not supported by mv_unet, which builds "
                f"{key} = {built[key]!r}; this UNet cannot be reproduced")


def from_sd_unet(cls: type, path: Path, defaults: dict[str, Any], defaults_from: str, overrides: dict[str, Any]):
    source = read_source(path)
    if source.kind() != "sd_unet" or source.class_name not in (None, "UNet2DConditionModel"):
        raise wrong_kind_error(source, cls, expected="sd_unet")
    if source.config is None:
        raise CheckpointMismatchError(
            f"init_from {source.weights_file}: an SD UNet is read from its folder (config.json + weights), "
            "not from a bare weights file")
    where = str(source.config_file)
    config = merge_init_config(cls, sd_unet_architecture(source.config), where, defaults, defaults_from, overrides)
    model = build(cls, config, where, defaults, defaults_from)
    check_reproducible(source.config, dict(model.unet.config), source.config_file)
    load_sd_weights(model, source.state_dict, source.weights_file)
    return model


def load_sd_weights(model, state_dict: dict[str, torch.Tensor], file: Path) -> None:
    """Copy SD weights into `model.unet`: text attention dropped, conv_in widened with zeros for
    the 7 camera channels under concat injection, q/k norms (if on) left at their init."""
    pretrained = {k: v for k, v in state_dict.items() if not TEXT_ATTENTION.search(k)}
    own = model.unet.state_dict()
    w = own["conv_in.weight"]  # [C0, C_in (+ 7), k, k]
    expected = dict(own, **{"conv_in.weight": w.new_empty(w.shape[0], model.config.in_channels, *w.shape[2:])})
    fresh = model.fresh_keys_ok(dict(model.config), {})
    check_keys(file, expected, pretrained, fresh_ok=fresh)
    if fresh:
        warn_not_source(type(model), "qk_norm=True adds fresh q/k LayerNorms")

    conv_in = pretrained.pop("conv_in.weight")  # [C0, C_sd, k, k]
    widened = torch.zeros_like(w)
    widened[:, : conv_in.shape[1]] = conv_in  # x_t channels come first, then the camera channels
    pretrained["conv_in.weight"] = widened
    missing, unexpected = model.unet.load_state_dict(pretrained, strict=False)
    assert not unexpected and all(k.endswith(fresh) for k in missing), (missing, unexpected)  # checked above
