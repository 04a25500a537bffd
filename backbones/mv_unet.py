"""The `mv_unet` backbone: a CAT3D-style multi-view UNet on diffusers blocks, with SD-format init.

A Stable-Diffusion UNet whose self-attention layers run through `multiview_attention`: lower
levels attend over every view's tokens (3D), the top level within each view, as in the CAT3D*
re-implementation CAMEO trains on (MVGenMaster). Text cross-attention is removed; cameras enter as
per-view Plücker raymaps + the reference/target mask, either through a zero-initialised conv
encoder added after `conv_in` (the official recipe, default) or concatenated to the input (the
CAT3D paper). The stock `UNet2DConditionModel` builds the blocks and keeps SD weight names, so
`from_sd_checkpoint` (behind `create_backbone("mv_unet", init_from=FOLDER)`, mapping in
`backbones.init_sd_unet`) loads a Stable-Diffusion UNet folder by renaming nothing.
`input_patch` > 1 runs the UNet on a pixel-unshuffled grid (the CPU analogue of a latent grid).
`camera_levels="attention"` additionally adds a (zero-initialised) embedding of the raymap, pooled
to each level's grid, to the input of every attention site, so 3D attention can match by ray.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from einops import rearrange
from torch import nn

from backbones.attention import multiview_attention
from backbones.camera import CameraEncoder
from backbones.interface import AttentionLayer, MultiViewBackbone, TapState
from backbones.registry import get_backbone_spec, register_backbone

CAMERA_CHANNELS = 7  # 6 Plücker + 1 reference/target mask
# attn2 is built only because diffusers 0.42.1 raises on cross_attention_dim=None; it is deleted
# right after construction, so the width is irrelevant (kept small to save memory).
_DUMMY_CROSS_ATTENTION_DIM = 8

PRESETS = {
    # unit tests: per-view top level (16 px) and a 3D lower level, so both kinds are exercised
    "micro": dict(
        block_out_channels=(16, 32), layers_per_block=1, num_heads=(1, 2),
        attention_levels=(True, True), cross_view_levels=(False, True),
        norm_num_groups=8, camera_hidden=16,
    ),
    # CPU benchmark (notes/backbones.md §5.2): no top-level attention, 3D at 16/8 px for 32 px input
    "tiny": dict(
        block_out_channels=(32, 64, 64), layers_per_block=1, num_heads=(2, 2, 2),
        attention_levels=(False, True, True), cross_view_levels=(False, True, True),
        norm_num_groups=16, camera_hidden=32,
    ),
    "small": dict(
        block_out_channels=(64, 128, 128), layers_per_block=2, num_heads=(4, 4, 4),
        attention_levels=(False, True, True), cross_view_levels=(False, True, True),
        norm_num_groups=32, camera_hidden=64,
    ),
    # SD-2.1 layout (CAT3D*/CAMEO): 16 self-attention layers, head_dim 64, per-view at 64x64 only
    "sd21": dict(
        in_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        num_heads=(5, 10, 20, 20), attention_levels=(True, True, True, False),
        cross_view_levels=(False, True, True, True), norm_num_groups=32, camera_hidden=256,
    ),
}


@dataclass(frozen=True)
class _ForwardContext:
    """What every processor needs from one forward call.

    It travels as an explicitly named processor kwarg (diffusers drops unnamed ones) rather than
    as processor state, because gradient checkpointing re-runs the attention during backward, after
    the forward has returned: the recomputation must see the same perturbation and tap state.
    """

    state: TapState
    height: int  # input H, W in pixels of x_t: a layer's grid is (H / stride, W / stride)
    width: int
    # camera_levels != "input": per attention site (Transformer2DModel), the embedding added to its
    # input hidden states, [(B V), C_site, h, w]; empty otherwise
    level_cameras: dict[str, torch.Tensor] | None = None


CAMERA_LEVELS = ("input", "attention", "attention_sincos")
_SINCOS_FREQS = 4  # per axis: 4 frequencies x (sin, cos) x (y, x) = 16 channels


def _sincos_grid(h: int, w: int, device, dtype) -> torch.Tensor:  # [16, h, w]
    """Fixed 2D sinusoidal features of a token's position in its view's grid, in [0, 1) units so
    every level sees the same function of image position (frequencies 1, 2, 4, 8 cycles per image)."""
    ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w
    freqs = 2 ** torch.arange(_SINCOS_FREQS, device=device, dtype=dtype) * math.pi  # [F]
    fy = ys[None, :, None] * freqs[:, None, None]  # [F, h, 1]
    fx = xs[None, None, :] * freqs[:, None, None]  # [F, 1, w]
    feats = [fy.sin().expand(-1, h, w), fy.cos().expand(-1, h, w), fx.sin().expand(-1, h, w), fx.cos().expand(-1, h, w)]
    return torch.cat(feats, dim=0)


class LevelCameraEmbedding(nn.Module):
    """The raymap at one attention site's grid -> an additive embedding of that site's width.

    The 7-channel camera signal (6 Plücker + mask) is average-pooled by the site's stride (the mean
    ray over each token's pixel footprint) and, for `sincos`, concatenated with fixed 2D position
    features; a per-token MLP (1x1 conv, SiLU, 1x1 conv) maps it to the site's channels. The last
    layer is zero-initialised, so at init the embedding is exactly 0 and a model initialised from an
    SD checkpoint still computes the stock UNet.
    """

    def __init__(self, channels: int, stride: int, hidden: int, sincos: bool):
        super().__init__()
        self.stride, self.sincos = stride, sincos
        in_channels = CAMERA_CHANNELS + (4 * _SINCOS_FREQS if sincos else 0)
        self.body = nn.Sequential(nn.Conv2d(in_channels, hidden, 1), nn.SiLU())
        self.out = nn.Conv2d(hidden, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, cam: torch.Tensor) -> torch.Tensor:  # [N, 7, H, W] -> [N, C, H/s, W/s]
        x = F.avg_pool2d(cam, self.stride) if self.stride > 1 else cam  # [N, 7, h, w]
        if self.sincos:
            pos = _sincos_grid(*x.shape[-2:], x.device, x.dtype)  # [16, h, w]
            x = torch.cat([x, pos.expand(x.shape[0], -1, -1, -1)], dim=1)
        return self.out(self.body(x))


def _add_level_camera(module: nn.Module, args: tuple, kwargs: dict, key: str):
    """Forward pre-hook on a Transformer2DModel: hidden states += that site's camera embedding.

    A top-level function plus a string key (not a bound method or closure), so `copy.deepcopy` of
    the model (EMA) keeps working; the embedding comes with the forward's own context, computed
    once per forward in `_denoise`."""
    context = (kwargs.get("cross_attention_kwargs") or {}).get("mv_context")
    if context is None or not context.level_cameras:
        return None
    hidden = args[0] if args else kwargs["hidden_states"]  # [(B V), C, h, w]
    hidden = hidden + context.level_cameras[key].to(hidden.dtype)
    if args:
        return (hidden, *args[1:]), kwargs
    return args, dict(kwargs, hidden_states=hidden)


class MultiViewAttnProcessor:
    """diffusers processor: SD's attn1 weights, the project's multi-view attention."""

    def __init__(self, layer_name: str, cross_view: bool, stride: int):
        self.layer_name, self.cross_view, self.stride = layer_name, cross_view, stride

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,  # [(B V), h*w, C]
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        mv_context: _ForwardContext | None = None,
    ) -> torch.Tensor:
        if mv_context is None:
            raise RuntimeError(
                f"{self.layer_name}: no multi-view context; call the MultiViewUNet, not its inner UNet"
            )
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(f"{self.layer_name}: self-attention only, got encoder states or a mask")
        num_views = mv_context.state.num_views
        h, w = mv_context.height // self.stride, mv_context.width // self.stride

        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k, v = (
            rearrange(x, "(b v) n (H d) -> b H (v n) d", v=num_views, H=attn.heads) for x in (q, k, v)
        )  # [B, H, V*h*w, d] view-major
        if attn.norm_q is not None:  # per-head LayerNorm over d, as diffusers' qk_norm="layer_norm"
            q, k = attn.norm_q(q), attn.norm_k(k)
        out = multiview_attention(
            q, k, v, grid=(num_views, h, w), cross_view=self.cross_view,
            layer_name=self.layer_name, state=mv_context.state, upcast=attn.upcast_attention,
        )  # [B, H, V*h*w, d]
        out = rearrange(out, "b H (v n) d -> (b v) n (H d)", v=num_views)
        return attn.to_out[1](attn.to_out[0](out))  # linear, dropout


def _per_level(value, levels: int, key: str) -> tuple:
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * levels
    if len(values) != levels:
        raise ValueError(f"{key} needs one entry per level ({levels}), got {values}")
    return values


@register_backbone("mv_unet", presets=PRESETS, default_preset="tiny")
class MultiViewUNet(MultiViewBackbone, ModelMixin, ConfigMixin):
    """CAT3D-style UNet: SD blocks, 3D self-attention below the top level, camera raymaps.

    Per-level config lists run from the top (full resolution) level down; the mid block follows the
    lowest level's `cross_view_levels` entry. `num_heads` is the number of heads per level (the
    value SD configs store under the misleading name `attention_head_dim`). `upcast_attention`
    computes attention in float32 under bf16/fp16 (SD-2.x configs set it). `input_patch` = p > 1
    pixel-unshuffles x_t by p before `conv_in` and pixel-shuffles the output back, so every level
    runs on a p-times smaller grid (attention strides are p * 2**level); the camera raymap is still
    built at the input resolution and the camera encoder strides it down to the first grid.

    `camera_levels` says where cameras enter: "input" (default; only through `camera_injection`)
    or also at every attention site ("attention": pooled raymap; "attention_sincos": pooled raymap
    + fixed 2D sinusoidal positions), each through its own zero-initialised `LevelCameraEmbedding`
    added to the hidden states entering the site's Transformer2DModel. Why: with input-only
    injection the cameras are one additive term at conv_in, washed out by the time the 3D
    attention runs, so a query token of a noisy target has neither ray nor position to find its
    match in a reference (the DiT, which has rays and positions on every token, does). Adding at
    the transformer input (rather than to q/k only) puts the signal in the residual stream as the
    DiT does, costs one small MLP per site, and needs no change to the attention processor.
    Measured on the tiny preset (input_patch 2, 32 px, 1000 steps, interpolation regime): no gain over
    "input" (13.63 / 13.61 dB vs 13.90), so this hypothesis does not explain that model's weakness.
    """

    _supports_gradient_checkpointing = True
    # a model initialised from a checkpoint takes these from a preset or an override (the rest
    # comes from the SD config: see backbones.init_sd_unet)
    init_overridable = (
        "cross_view_levels", "qk_norm", "camera_injection", "camera_hidden", "dropout", "camera_levels",
    )
    per_view_config = {"cross_view_levels": False}  # every level, and the mid block, per-view

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int | None = None,
        block_out_channels: tuple[int, ...] = (32, 64, 64),
        layers_per_block: int = 1,
        num_heads: int | tuple[int, ...] = 2,
        attention_levels: tuple[bool, ...] = (False, True, True),
        cross_view_levels: tuple[bool, ...] = (False, True, True),
        norm_num_groups: int = 32,
        qk_norm: bool = True,
        camera_injection: str = "add",
        camera_hidden: int = 32,
        use_linear_projection: bool = True,
        dropout: float = 0.0,
        upcast_attention: bool = False,
        input_patch: int = 1,
        camera_levels: str = "input",
    ):
        super().__init__()
        levels = len(block_out_channels)
        heads = _per_level(num_heads, levels, "num_heads")
        attention_levels = _per_level(attention_levels, levels, "attention_levels")
        cross_view_levels = _per_level(cross_view_levels, levels, "cross_view_levels")
        for level, (channels, n_heads) in enumerate(zip(block_out_channels, heads)):
            if channels % norm_num_groups:
                raise ValueError(
                    f"norm_num_groups={norm_num_groups} does not divide block_out_channels[{level}]={channels}"
                )
            if channels % n_heads:
                raise ValueError(f"num_heads[{level}]={n_heads} does not divide {channels} channels")
        if camera_injection not in ("add", "concat"):
            raise ValueError(f"camera_injection must be 'add' or 'concat', got {camera_injection!r}")
        if camera_levels not in CAMERA_LEVELS:
            raise ValueError(f"camera_levels must be one of {CAMERA_LEVELS}, got {camera_levels!r}")
        if not isinstance(input_patch, int) or input_patch < 1:
            raise ValueError(f"input_patch must be a positive integer, got {input_patch!r}")

        out_channels = in_channels if out_channels is None else out_channels
        p2 = input_patch**2  # pixel_unshuffle folds each p x p patch into the channels
        self.unet = UNet2DConditionModel(
            sample_size=None,
            in_channels=(in_channels + (CAMERA_CHANNELS if camera_injection == "concat" else 0)) * p2,
            out_channels=out_channels * p2,
            down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels),
            up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attention_levels[::-1]),
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            attention_head_dim=heads,  # diffusers quirk: this is the number of heads
            cross_attention_dim=_DUMMY_CROSS_ATTENTION_DIM,
            norm_num_groups=norm_num_groups,
            use_linear_projection=use_linear_projection,
            dropout=dropout,
            upcast_attention=upcast_attention,
        )
        self.camera_encoder = (
            CameraEncoder(CAMERA_CHANNELS, block_out_channels[0], downsample=input_patch, hidden=camera_hidden)
            if camera_injection == "add" else None
        )
        self._layers, self._layer_paths = self._inflate_attention(heads, cross_view_levels, qk_norm, input_patch)
        # built after the UNet so the default ("input") consumes no random numbers: same init as before
        self.level_cameras = (
            self._level_camera_embeddings(input_patch, camera_hidden, sincos=camera_levels == "attention_sincos")
            if camera_levels != "input" else None
        )

    def _level_camera_embeddings(self, input_patch: int, hidden: int, sincos: bool) -> nn.ModuleDict:
        """One LevelCameraEmbedding per Transformer2DModel (attention site), keyed by its module
        path with '.' -> '_', and a forward pre-hook on the transformer that adds it."""
        levels = len(self.config.block_out_channels)
        sites = [(f"unet.down_blocks.{i}", i) for i in range(levels)]
        sites.append(("unet.mid_block", levels - 1))
        sites += [(f"unet.up_blocks.{i}", levels - 1 - i) for i in range(levels)]
        embeddings = nn.ModuleDict()
        for block_path, level in sites:
            for a, transformer in enumerate(getattr(self.get_submodule(block_path), "attentions", None) or []):
                key = f"{block_path}.attentions.{a}".replace(".", "_")
                embeddings[key] = LevelCameraEmbedding(
                    transformer.config.in_channels, stride=input_patch * 2**level, hidden=hidden, sincos=sincos)
                transformer.register_forward_pre_hook(partial(_add_level_camera, key=key), with_kwargs=True)
        return embeddings

    def _inflate_attention(self, heads, cross_view_levels, qk_norm, input_patch):
        """Drop text cross-attention, add q/k norm, install the multi-view processor per layer.

        Names follow forward execution order (resnet -> attention inside each block; down, mid,
        up), which is also the order of `attentions[j].transformer_blocks[t]` inside a block.
        Stages follow the blocks: down = `encoder`, mid = `mid`, up = `decoder`. A level's stride
        in input pixels is input_patch * 2**level.
        """
        levels = len(heads)
        sites = [(f"down.{i:02d}", f"unet.down_blocks.{i}", i, "encoder") for i in range(levels)]
        sites.append(("mid", "unet.mid_block", levels - 1, "mid"))
        sites += [(f"up.{i:02d}", f"unet.up_blocks.{i}", levels - 1 - i, "decoder") for i in range(levels)]

        layers, paths = [], {}
        for prefix, block_path, level, stage in sites:
            block = self.get_submodule(block_path)
            j = 0
            for a, transformer in enumerate(getattr(block, "attentions", None) or []):
                for t, basic in enumerate(transformer.transformer_blocks):
                    basic.attn2, basic.norm2 = None, None  # no text: the block then skips cross-attention
                    attn = basic.attn1
                    head_dim = attn.inner_dim // attn.heads
                    if qk_norm:
                        attn.norm_q, attn.norm_k = nn.LayerNorm(head_dim), nn.LayerNorm(head_dim)
                    name = f"{prefix}.attn.{j:02d}"
                    cross_view = bool(cross_view_levels[level])
                    stride = input_patch * 2**level
                    attn.set_processor(MultiViewAttnProcessor(name, cross_view, stride=stride))
                    layers.append(AttentionLayer(
                        name=name, cross_view=cross_view, num_heads=attn.heads, head_dim=head_dim,
                        stride=stride, index=len(layers), stage=stage,
                    ))
                    paths[name] = f"{block_path}.attentions.{a}.transformer_blocks.{t}.attn1"
                    j += 1
        return layers, paths

    # ---- the contract -------------------------------------------------------------------------
    def attention_layers(self) -> list[AttentionLayer]:
        return list(self._layers)

    def attention_module(self, name: str) -> nn.Module:
        """The diffusers `Attention` behind a layer name (holds to_q/to_k/to_v/norm_q/norm_k/to_out)."""
        self.get_attention_layer(name)  # raises with the valid names
        return self.get_submodule(self._layer_paths[name])

    def size_multiple(self) -> tuple[int, str]:
        p, levels = self.config.input_patch, len(self.config.block_out_channels)
        return p * 2 ** (levels - 1), f"input_patch {p} x one halving per level below the top"

    def _denoise(self, x_t: torch.Tensor, t: torch.Tensor, cam: torch.Tensor, state: TapState) -> torch.Tensor:
        B, V, _, H, W = x_t.shape
        p = self.config.input_patch
        unet = self.unet

        cam = rearrange(cam, "b v c h w -> (b v) c h w")  # [(B V), 7, H, W]
        level_cameras = (
            {key: emb(cam) for key, emb in self.level_cameras.items()}  # [(B V), C_site, h, w] each
            if self.level_cameras is not None else None
        )
        kwargs = {"mv_context": _ForwardContext(state, H, W, level_cameras)}
        x = rearrange(x_t, "b v c h w -> (b v) c h w")
        if self.camera_encoder is None:
            x = torch.cat([x, cam], dim=1)  # [(B V), C + 7, H, W]
        if p > 1:
            x = F.pixel_unshuffle(x, p)  # [(B V), C p^2, H/p, W/p]
        sample = unet.conv_in(x)  # [(B V), C0, H/p, W/p]
        if self.camera_encoder is not None:
            sample = sample + self.camera_encoder(cam)  # rays at H x W, strided down to H/p x W/p

        t = t.to(x_t.device).repeat_interleave(V)  # [(B V)]: the scene's timestep for each view
        temb = unet.time_embedding(unet.time_proj(t).to(x_t.dtype))  # [(B V), 4 C0]

        skips = (sample,)
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, res = block(hidden_states=sample, temb=temb, cross_attention_kwargs=kwargs)
            else:
                sample, res = block(hidden_states=sample, temb=temb)
            skips += res
        sample = unet.mid_block(sample, temb, cross_attention_kwargs=kwargs)
        for block in unet.up_blocks:
            res, skips = skips[-len(block.resnets):], skips[: -len(block.resnets)]
            if getattr(block, "has_cross_attention", False):
                sample = block(hidden_states=sample, temb=temb, res_hidden_states_tuple=res,
                               cross_attention_kwargs=kwargs)
            else:
                sample = block(hidden_states=sample, temb=temb, res_hidden_states_tuple=res)
        sample = unet.conv_out(unet.conv_act(unet.conv_norm_out(sample)))  # [(B V), C_out p^2, H/p, W/p]
        if p > 1:
            sample = F.pixel_shuffle(sample, p)  # [(B V), C_out, H, W]
        return rearrange(sample, "(b v) c h w -> b v c h w", v=V)

    # ---- Stable Diffusion initialisation (mapping and checks in backbones.init_sd_unet) ------------
    @classmethod
    def from_sd_checkpoint(cls, local_folder: str | Path, preset: str | None = None, **overrides) -> "MultiViewUNet":
        """Build from a local Stable-Diffusion UNet folder (a UNet folder, or a pipeline folder with
        `unet/`) and load its weights; what `create_backbone("mv_unet", preset, init_from=...)` does.

        The architecture (channels, levels, heads, norm groups, linear projection,
        `upcast_attention`) comes from its config.json; `preset` contributes only its multi-view
        fields (`init_overridable`), and overrides may set those. Attention is "inflated" to 3D by
        the processor alone, so every pretrained weight is reused as is; text cross-attention
        (attn2/norm2) is dropped. New parts start as identities: the camera encoder's last conv is
        zero (concat injection: the 7 camera input channels of conv_in are zero), and there are
        no q/k norms unless `qk_norm=True` is asked for (fresh LayerNorms are not a no-op: they
        change SD's output by ~5%; a warning says so). With one view the model then computes
        exactly the stock UNet with its cross-attention outputs zeroed (tests/test_pretrained_unet.py).
        """
        from backbones import init_sd_unet

        defaults = get_backbone_spec("mv_unet").preset(preset) if preset is not None else {}
        where = f"preset {preset!r}" if preset is not None else ""
        return init_sd_unet.from_sd_unet(cls, Path(local_folder), defaults, where, overrides)

    @classmethod
    def _from_foreign(cls, path, defaults, defaults_from, overrides) -> "MultiViewUNet":
        from backbones import init_sd_unet

        return init_sd_unet.from_sd_unet(cls, Path(path), defaults, defaults_from, overrides)
