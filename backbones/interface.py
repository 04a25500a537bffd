"""The contract every multi-view backbone honours: attention layers by name, taps, outputs.

Experiments, losses and analyses address attention layers by *name* only, so a new architecture
plugs into everything by implementing `MultiViewBackbone` and routing its self-attention through
`backbones.attention.multiview_attention`. Configs may name a layer by a selector instead
(`MultiViewBackbone.resolve_layer`, implemented in `backbones.selectors`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from backbones.camera import camera_conditioning
from backbones.selectors import UnknownLayerError, select_layer

__all__ = [  # UnknownLayerError is re-exported: backbones and tests import it from here
    "PERTURBATIONS", "QK_NORM_KEYS", "AttentionLayer", "BackboneOutput", "MultiViewBackbone", "TapRequest", "TapResult",
    "TapState", "UnknownLayerError",
]


@dataclass(frozen=True)
class AttentionLayer:
    """One self-attention layer, listed in forward execution order.

    `stride` is the token stride in input pixels, so pixel-level correspondences can be pooled to
    this layer's token grid without knowing the architecture. `stage` is the part of the network
    the layer sits in, so selectors can say "the first decoder layer" without parsing names: a UNet
    has `encoder` (down blocks), `mid` and `decoder` (up blocks); the isotropic DiT has one stage,
    `blocks` (no block of it is more "decoder" than another, so none pretends to be).
    """

    name: str
    cross_view: bool
    num_heads: int
    head_dim: int
    stride: int
    index: int = -1
    stage: str = ""


@dataclass
class TapRequest:
    """Ask one layer to hand out the q rows and k it fed to SDPA.

    `query_idx [B, Qs]` holds global token ids in the view-major layout (v*h*w + y*w + x);
    `None` means every token. The backbone never builds an N x N map: the loss does, in chunks.
    """

    layer: str
    query_idx: torch.Tensor | None = None
    want_features: bool = False


@dataclass
class TapResult:
    """What SDPA saw in the tapped layer, with its autograd graph.

    q [B, H, Qs, d] and k [B, H, N, d] are after q/k normalisation; logits are `q @ k^T * scale`.
    For a per-view layer the keys of each view are only those of the query's own view in the real
    forward, but `k` still holds all N tokens so cross-view analyses can be run on any layer.
    """

    q: torch.Tensor
    k: torch.Tensor
    scale: float
    grid: tuple[int, int, int]  # (V, h, w)
    query_idx: torch.Tensor  # [B, Qs]
    layer: str = ""
    cross_view: bool = True
    features: torch.Tensor | None = None  # [B, N, C] attention output before the out projection

    def logits(self, key_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Pre-softmax logits [B, H, Qs, Nk] (fp32), optionally for a subset of key tokens."""
        k = self.k if key_idx is None else self.k[:, :, key_idx]
        return torch.einsum("bhqd,bhkd->bhqk", self.q.float(), k.float()) * self.scale


@dataclass
class BackboneOutput:
    sample: torch.Tensor  # [B, V, C, H, W]
    tap: TapResult | None = None


@dataclass
class TapState:
    """Per-forward bookkeeping shared by all attention layers of one model.

    Write-once: gradient checkpointing recomputes the forward during backward, and a recomputed
    layer must neither overwrite the tap nor keep a second copy alive.
    """

    num_views: int = 1
    request: TapRequest | None = None
    perturb: dict[str, str] = field(default_factory=dict)
    result: TapResult | None = None


PERTURBATIONS = ("identity",)
QK_NORM_KEYS = (".norm_q.weight", ".norm_q.bias", ".norm_k.weight", ".norm_k.bias")  # both backbones' names


class MultiViewBackbone:
    """Mixin with the shared parts of the contract, listed FIRST in a backbone's bases
    (`class B(MultiViewBackbone, ModelMixin, ConfigMixin)`), so that its `forward` wins over
    `nn.Module`'s placeholder.

    `forward` is a template: it checks the inputs, the tap and the perturbations, builds the
    per-forward `TapState` and the camera signal, and calls the backbone's `_denoise`. A backbone
    implements `_denoise`, `size_multiple`, `attention_layers` and `attention_module`, and, to be
    initialised from a foreign checkpoint, `_from_foreign` (see `from_source`).

    `per_view_config` holds the config overrides under which every attention layer is per-view
    (the "no 3D attention" ablation); the registry-wide contract tests build it to check that
    nothing outside attention mixes views. `init_overridable` names the constructor fields an
    initialised model may take from a preset or an override (its multi-view parts); all others
    come from the source checkpoint.
    """

    per_view_config: ClassVar[dict[str, Any] | None] = None
    init_overridable: ClassVar[tuple[str, ...]] = ()

    def forward(
        self,
        x_t: torch.Tensor,  # [B, V, C, H, W]
        t: torch.Tensor,  # [B], one timestep per scene
        *,
        cam2world: torch.Tensor,  # [B, V, 4, 4]
        intrinsics: torch.Tensor,  # [B, V, 3, 3], pixels of this H x W input grid
        cond_mask: torch.Tensor,  # [B, V], 0 = reference, 1 = target
        tap: TapRequest | None = None,
        perturb: dict[str, str] | None = None,
    ) -> BackboneOutput:
        self.check_forward_inputs(x_t, t, cam2world, intrinsics, cond_mask)
        self.check_tap_and_perturb(tap, perturb)
        B, V, _, H, W = x_t.shape
        state = TapState(num_views=V, request=tap, perturb=dict(perturb or {}))
        # the camera signal at the input grid: each backbone brings it to its own token grid
        cam = camera_conditioning(intrinsics, cam2world, cond_mask, H, W).to(x_t.dtype)  # [B, V, 7, H, W]
        sample = self._denoise(x_t, t, cam, state)  # [B, V, C_out, H, W]
        return BackboneOutput(sample=sample, tap=state.result)

    def _denoise(self, x_t: torch.Tensor, t: torch.Tensor, cam: torch.Tensor, state: TapState) -> torch.Tensor:
        """x_t [B, V, C, H, W], t [B], cam [B, V, 7, H, W] -> sample [B, V, C_out, H, W]; the
        attention layers read the tap request and perturbations from `state` and write the tap."""
        raise NotImplementedError  # pragma: no cover - abstract

    def size_multiple(self) -> tuple[int, str]:
        """(m, why): H and W of x_t must be multiples of m, for the reason `why` names."""
        return 1, "no constraint"

    @classmethod
    def from_source(
        cls, path: str, *, defaults: dict[str, Any] | None = None, defaults_from: str = "", **overrides: Any
    ):
        """Build this backbone from a checkpoint and load its weights (`create_backbone(...,
        init_from=path)`): a folder written by this class's `save_pretrained`, or the foreign
        format(s) the backbone's `_from_foreign` reads. The architecture comes from the source;
        `defaults` (a preset's multi-view fields, named by `defaults_from`) and `overrides` may
        set only `init_overridable` fields, and an override of any other field must equal the
        source's value. Errors name the file and the first missing/unexpected keys.
        """
        from backbones import checkpoints

        return checkpoints.from_source(cls, path, defaults or {}, defaults_from, overrides)

    @classmethod
    def fresh_keys_ok(cls, config: dict[str, Any], source_config: dict[str, Any]) -> tuple[str, ...]:
        """Key suffixes an initialised model may lack in its source (they keep their init): the
        q/k norms when `qk_norm` is turned on over a source without them. Fresh LayerNorms are
        not a no-op (they change SD's output by ~5%), hence initialising defaults to no q/k norm
        and turning it on warns."""
        return QK_NORM_KEYS if config.get("qk_norm") and not source_config.get("qk_norm") else ()

    @classmethod
    def _from_foreign(cls, path, defaults: dict[str, Any], defaults_from: str, overrides: dict[str, Any]):
        """Initialise from a checkpoint that is not this class's own save_pretrained folder."""
        from backbones import checkpoints

        raise checkpoints.wrong_kind_error(checkpoints.read_source(path), cls, expected="save_pretrained")

    def attention_layers(self) -> list[AttentionLayer]:  # pragma: no cover - abstract
        raise NotImplementedError

    def attention_module(self, name: str) -> nn.Module:  # pragma: no cover - abstract
        """The module whose projections feed attention layer `name`.

        Lets tests and analyses recompute a layer's attention naively without knowing the
        architecture. The module has diffusers `Attention` attribute names: `to_q`, `to_k`,
        `to_v` (`nn.Linear`, heads concatenated as `(heads head_dim)`), `norm_q`, `norm_k`
        (per-head norms over head_dim, or None). It is called exactly once per forward (a
        checkpointed backward recomputes it once more) with the tokens the projections read as
        its first argument (positional or `hidden_states=`), either `[B, V*h*w, C]` or
        `[(B V), h*w, C]`, view-major in both cases.
        Raise `UnknownLayerError` for unknown names.
        """
        raise NotImplementedError

    def input_embedding(self) -> nn.Module:
        """The module that first reads x_t (`conv_in` of a UNet, the patch embed of a DiT).

        The tap's gradient must reach it; the default finds a submodule named `conv_in` or
        `patch_embed` (at any depth), backbones with other names override this.
        """
        for name, module in self.named_modules():  # type: ignore[attr-defined]
            if name.rsplit(".", 1)[-1] in ("conv_in", "patch_embed"):
                return module
        raise NotImplementedError(f"{type(self).__name__} must override input_embedding()")

    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.attention_layers()]

    def get_attention_layer(self, name: str) -> AttentionLayer:
        for layer in self.attention_layers():
            if layer.name == name:
                return layer
        raise UnknownLayerError(name, self.layer_names())

    def stages(self) -> list[str]:
        """The stages of `attention_layers()` in forward order, each once."""
        return list(dict.fromkeys(layer.stage for layer in self.attention_layers()))

    def resolve_layer(self, selector: str, input_stride: int = 1) -> str:
        """Turn a layer name or a selector into a layer name.

        Grammar: an exact name (`up.02.attn.00`, `blocks.02.attn`), or `[STAGE:]RULE` where STAGE
        restricts the choice to one stage (`encoder`, `mid`, `decoder` on the UNet; `blocks` on the
        DiT; see `AttentionLayer.stage`) and RULE is one of
          - `first`, `last`: the first / last layer in forward order;
          - `first_cross_view`, `last_cross_view`: the first / last layer attending across views;
          - `depth:F`: the layer at fraction F in [0, 1] of the forward order (rounded to nearest);
          - `1/N`: the first layer whose token grid is 1/N of the image side, i.e. whose
            `stride * input_stride == N`. `input_stride` is the model input's stride in image
            pixels: 1 for pixel-space models, 8 for SD latents. On the `sd21` UNet
            `resolve_layer("decoder:1/16", input_stride=8)` is `up.02.attn.00` (CAMEO's layer 10).
        Anything else raises `UnknownLayerError` listing the layers, the stages and this grammar.
        """
        return select_layer(self.attention_layers(), selector, input_stride)

    def check_forward_inputs(self, x_t, t, cam2world, intrinsics, cond_mask) -> None:
        """The shape contract of `forward`, shared by every backbone, plus its `size_multiple`."""
        if x_t.ndim != 5:
            raise ValueError(f"x_t must have shape [B, V, C, H, W], got {tuple(x_t.shape)}")
        B, V, C, H, W = x_t.shape
        if C != self.config.in_channels:  # type: ignore[attr-defined]
            raise ValueError(f"x_t has {C} channels, the model expects in_channels={self.config.in_channels}")  # type: ignore[attr-defined]
        expected = {"t": (B,), "cam2world": (B, V, 4, 4), "intrinsics": (B, V, 3, 3), "cond_mask": (B, V)}
        for key, value in zip(expected, (t, cam2world, intrinsics, cond_mask)):
            if tuple(value.shape) != expected[key]:
                raise ValueError(f"{key} must have shape {list(expected[key])}, got {list(value.shape)}")
        multiple, why = self.size_multiple()
        if H % multiple or W % multiple:
            raise ValueError(f"x_t size {H}x{W} must be divisible by {multiple} ({why})")

    def check_tap_and_perturb(self, tap: TapRequest | None, perturb: dict | None) -> None:
        names = self.layer_names()
        if tap is not None and tap.layer not in names:
            raise UnknownLayerError(tap.layer, names)
        for name, mode in (perturb or {}).items():
            if name not in names:
                raise UnknownLayerError(name, names)
            if mode not in PERTURBATIONS:
                raise ValueError(f"unknown perturbation {mode!r} for {name}; valid: {PERTURBATIONS}")
