"""Writing a backbone in the foreign layouts `init_from` reads: a DiT state dict (mv_dit), an SD UNet folder (mv_unet).

The inverse of `backbones.init_dit` and `backbones.init_sd_unet`. A single-view image prior trained
here and written in its source layout is read back by `create_backbone(..., init_from=...)` as
the same model, with the multi-view parts (camera path, view embedding) starting as identities:
the CPU analogue of SD-2.1 -> CAT3D, where the image model knows nothing of cameras. The
backbone's own `save_pretrained` folder keeps everything and needs none of this; these layouts
hold only what DiT or SD hold, so a model is exportable only when nothing else is in use:
  * the camera path is zero (`camera_parameters`; an engine keeps it so with `zero_camera_path`
    + `freeze_camera_path`), since neither DiT nor SD takes cameras;
  * no q/k norm (neither has one);
  * mv_dit: no view embedding (or an all-zero learned one); sincos or learned positions (both are
    written as DiT's `pos_embed`);
  * mv_unet: `input_patch = 1` (an SD UNet's conv_in sees the image/latent itself).
`check_exportable` names whatever stands in the way: nothing is written approximately.

Files: `dit.pt` is a plain state dict in facebookresearch/DiT's key layout (as its released
checkpoints are), with a one-row `y_embedder` (the null class only, zero: an unconditional DiT);
the SD folder is what `UNet2DConditionModel.save_pretrained` writes, text cross-attention included
with a zero output projection, so that stock diffusers loads it without missing keys and computes
the same function for any text input.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["LAYOUTS", "camera_parameters", "zero_camera_path", "freeze_camera_path", "check_exportable",
           "dit_state_dict", "save_dit", "save_sd_unet", "export"]

LAYOUTS = {"dit": "mv_dit", "sd_unet": "mv_unet"}  # layout -> the backbone that can be written in it
DIT_FILE = "dit.pt"
SD_UNET_FOLDER = "sd_unet"


class NotExportableError(ValueError):
    """A model that a foreign layout cannot hold without changing what it computes."""


def _backbone(model: nn.Module) -> str:
    name = type(model).__name__
    return {"MultiViewDiT": "mv_dit", "MultiViewUNet": "mv_unet"}.get(name, name)


def _camera_columns(model: nn.Module) -> tuple[nn.Parameter, int] | None:
    """(conv weight, first camera input channel) where cameras enter by concatenation, else None."""
    if _backbone(model) == "mv_dit":
        return model.patch_embed.proj.weight, model.config.in_channels  # [D, C + 7, p, p]
    if model.camera_encoder is None:  # mv_unet, concat injection; pixel_unshuffle keeps channels c-major
        return model.unet.conv_in.weight, model.config.in_channels * model.config.input_patch ** 2
    return None


def _camera_outputs(model: nn.Module) -> dict[str, nn.Module]:
    """The zero-initialised last layers (like a ControlNet's) through which cameras are added:
    mv_unet's camera encoder (add injection) and its per-attention-site embeddings (`camera_levels`)."""
    outs = {}
    if _backbone(model) == "mv_unet":
        if model.camera_encoder is not None:
            outs["camera_encoder.out"] = model.camera_encoder.out
        for key, embedding in (model.level_cameras or {}).items():
            outs[f"level_cameras.{key}.out"] = embedding.out
    return outs


def camera_parameters(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every weight through which cameras (and the reference mask) reach the
    model; all zero means the model ignores its cameras. Views into concatenated convs are slices."""
    columns = _camera_columns(model)
    found = [] if columns is None else [("camera input channels", columns[0].detach()[:, columns[1]:])]
    return found + [(f"{prefix}.{n}", p.detach()) for prefix, out in _camera_outputs(model).items()
                    for n, p in out.named_parameters()]


@torch.no_grad()
def zero_camera_path(model: nn.Module) -> None:
    """Set the camera path to zero: the model then computes the same for any cameras."""
    for _, tensor in camera_parameters(model):
        tensor.zero_()


def freeze_camera_path(model: nn.Module) -> None:
    """Keep the camera path where it is during training: its gradients are zeroed (a sliced conv
    by a gradient hook), so AdamW's moments and its update stay 0 there and weight decay of 0 is 0."""
    for out in _camera_outputs(model).values():
        out.requires_grad_(False)
    columns = _camera_columns(model)
    if columns is not None:
        weight, start = columns
        mask = torch.ones_like(weight)
        mask[:, start:] = 0
        weight.register_hook(lambda grad: grad * mask.to(grad))


def check_exportable(model: nn.Module, layout: str) -> None:
    """Raise `NotExportableError` naming every reason `model` cannot be written in `layout`."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; valid: {sorted(LAYOUTS)}")
    backbone = _backbone(model)
    if LAYOUTS[layout] != backbone:
        raise NotExportableError(f"layout {layout!r} holds a {LAYOUTS[layout]} model, not {backbone} "
                                 f"(valid for {backbone}: {[k for k, v in LAYOUTS.items() if v == backbone]})")
    cfg = model.config
    why = []
    live = [name for name, tensor in camera_parameters(model) if tensor.abs().max() > 0]
    if live:
        why.append(f"its camera path is not zero ({', '.join(live)}): train it camera-inert")
    if cfg.qk_norm:
        why.append("qk_norm=True (the layout has no q/k norm): build it with qk_norm=False")
    if backbone == "mv_dit" and model.view_embedding is not None and model.view_embedding.abs().max() > 0:
        why.append("a non-zero learned view embedding")
    if backbone == "mv_dit" and cfg.view_embed == "sincos":
        why.append("view_embed='sincos'")
    if backbone == "mv_unet" and cfg.input_patch != 1:
        why.append(f"input_patch={cfg.input_patch} (an SD UNet's conv_in sees the input grid itself)")
    if why:
        raise NotExportableError(f"{type(model).__name__} cannot be written as {layout!r} without changing what it "
                                 f"computes: {'; '.join(why)}. Its save_pretrained folder keeps everything.")


@torch.no_grad()
def dit_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The facebookresearch/DiT keys of an exportable mv_dit (the inverse of `init_dit.convert`)."""
    check_exportable(model, "dit")
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    C, D = model.config.in_channels, model.config.hidden_size
    out = {
        "x_embedder.proj.weight": sd["patch_embed.proj.weight"][:, :C].contiguous(),  # camera channels are zero
        "x_embedder.proj.bias": sd["patch_embed.proj.bias"],
        "t_embedder.mlp.0.weight": sd["t_embedder.linear_1.weight"],
        "t_embedder.mlp.0.bias": sd["t_embedder.linear_1.bias"],
        "t_embedder.mlp.2.weight": sd["t_embedder.linear_2.weight"],
        "t_embedder.mlp.2.bias": sd["t_embedder.linear_2.bias"],
        "y_embedder.embedding_table.weight": torch.zeros(1, D),  # the null class alone: unconditional
    }
    grid = model.base_grid
    positions = model.pos_embedding if model.pos_embedding is not None else model._sincos_2d(grid, grid)
    out["pos_embed"] = positions.detach().float().reshape(1, grid * grid, D).clone()
    for i in range(model.config.depth):
        b = f"blocks.{i}."
        for name in ("weight", "bias"):
            out[f"{b}attn.qkv.{name}"] = torch.cat([sd[f"{b}attn.to_{x}.{name}"] for x in "qkv"])  # rows q | k | v
            out[f"{b}attn.proj.{name}"] = sd[f"{b}attn.to_out.{name}"]
            for part in ("mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
                out[f"{b}{part}.{name}"] = sd[f"{b}{part}.{name}"]
    for part in ("final_layer.linear", "final_layer.adaLN_modulation.1"):  # no learned-sigma rows
        for name in ("weight", "bias"):
            out[f"{part}.{name}"] = sd[f"{part}.{name}"]
    return out


def save_dit(model: nn.Module, path: str | Path) -> Path:
    """Write `dit_state_dict(model)` as a torch file (the released DiT checkpoints' form)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dit_state_dict(model), path)
    return path


@torch.no_grad()
def save_sd_unet(model: nn.Module, folder: str | Path) -> Path:
    """Write an exportable mv_unet's inner UNet as a stock `UNet2DConditionModel` folder: camera
    channels of conv_in dropped, text cross-attention present with a zero output projection."""
    from diffusers import UNet2DConditionModel

    check_exportable(model, "sd_unet")
    C = model.config.in_channels
    config = {k: v for k, v in model.unet.config.items() if not k.startswith("_")}
    config.update(in_channels=C, out_channels=model.config.out_channels or C)
    with torch.random.fork_rng(devices=[]):  # the stock model's fresh text attention draws nothing from the run
        stock = UNet2DConditionModel.from_config(config)
    weights = stock.state_dict()
    for key, value in model.unet.state_dict().items():
        weights[key] = value[:, :C] if key == "conv_in.weight" else value
    for key in weights:
        if ".attn2.to_out." in key:
            weights[key] = torch.zeros_like(weights[key])  # text attention adds exactly 0
    stock.load_state_dict(weights)
    folder = Path(folder)
    stock.save_pretrained(folder)
    return folder


def export(model: nn.Module, folder: str | Path, layout: str) -> Path:
    """Write `model` in `layout` inside `folder`: `dit.pt` or `sd_unet/`; returns what `init_from` takes."""
    folder = Path(folder)
    if layout == "dit":
        return save_dit(model, folder / DIT_FILE)  # both check exportability first
    if layout == "sd_unet":
        return save_sd_unet(model, folder / SD_UNET_FOLDER)
    raise ValueError(f"unknown layout {layout!r}; valid: {sorted(LAYOUTS)}")
