"""The `mv_dit` backbone: DiT's adaLN-Zero transformer over the tokens of all views at once.

Each view's x_t is patchified together with its 7 camera channels (Plücker relative to the
reference camera + the reference/target mask), the views' tokens are concatenated view-major and
every block runs self-attention over all of them through `backbones.attention.multiview_attention`
(the DiT analogue of CAT3D's 3D attention). Reads top-down like DiT's `models.py`: embedders, the
attention, the block, the final layer, the model, its initialisation, then the presets. Weight
names follow DiT where they can (`blocks.N.adaLN_modulation`, `mlp.fc1`, `final_layer`), so
`create_backbone("mv_dit", init_from=DIT_CHECKPOINT)` (mapping in `backbones.init_dit`) loads a
facebookresearch/DiT checkpoint with a handful of renames.
"""
from __future__ import annotations

from functools import partial
from typing import Literal

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import (
    TimestepEmbedding,
    Timesteps,
    get_1d_sincos_pos_embed_from_grid,
    get_2d_sincos_pos_embed,
)
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange
from timm.layers import Mlp, PatchEmbed
from torch import nn

from backbones.attention import multiview_attention
from backbones.interface import AttentionLayer, MultiViewBackbone, TapState, UnknownLayerError
from backbones.registry import register_backbone

CAMERA_CHANNELS = 7  # Plücker (6) + reference/target mask (1), see backbones.camera


def sincos_2d(dim: int, h: int, w: int, base_grid: int, device=None) -> torch.Tensor:  # [h*w, D], row-major
    """DiT's fixed 2D sincos positions (MAE's: sin|cos of y in the first half of the channels, of x
    in the second); at the `base_grid` the positions are the integer token coordinates, equal to
    the `pos_embed` DiT stores, to the bit; other grids are stretched to span the base grid."""
    emb = get_2d_sincos_pos_embed(dim, (h, w), base_size=base_grid, device=device, output_type="pt")
    return emb.float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class MultiViewSelfAttention(nn.Module):
    """Self-attention over view-major tokens, 3D or per-view.

    Separate `to_q`/`to_k`/`to_v` (diffusers `Attention` names rather than timm's fused `qkv`)
    so that both backbones expose the same projection names to losses and contract tests; the
    parameter count equals a fused qkv.
    """

    def __init__(self, dim: int, num_heads: int, *, qk_norm: bool, cross_view: bool, layer_name: str):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.heads, self.head_dim = num_heads, dim // num_heads
        self.cross_view, self.layer_name = cross_view, layer_name
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        # Per-head LayerNorm on q and k keeps logits bounded over long multi-view sequences.
        self.norm_q = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else None
        self.norm_k = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else None
        self.to_out = nn.Linear(dim, dim)

    def forward(
        self,
        hidden_states: torch.Tensor,  # [B, N, D], N = V*h*w view-major
        *,
        grid: tuple[int, int, int],
        state: TapState | None,
    ) -> torch.Tensor:  # [B, N, D]
        q, k, v = (
            rearrange(proj(hidden_states), "b n (H d) -> b H n d", H=self.heads)
            for proj in (self.to_q, self.to_k, self.to_v)
        )  # [B, H, N, d] each
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        out = multiview_attention(
            q, k, v, grid=grid, cross_view=self.cross_view, layer_name=self.layer_name, state=state
        )  # [B, H, N, d]
        return self.to_out(rearrange(out, "b H n d -> b n (H d)"))


class DiTBlock(nn.Module):
    """DiT block with adaLN-Zero: the timestep sets shift, scale and a gate for each branch."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, *, qk_norm: bool, cross_view: bool, layer_name: str
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = MultiViewSelfAttention(
            dim, num_heads, qk_norm=qk_norm, cross_view=cross_view, layer_name=layer_name
        )
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=partial(nn.GELU, approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(
        self,
        x: torch.Tensor,  # [B, N, D]
        c: torch.Tensor,  # [B, D]
        grid: tuple[int, int, int],
        state: TapState,
    ) -> torch.Tensor:
        mods = self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)  # 6 x [B, 1, D]
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mods
        x = x + gate_a * self.attn(modulate(self.norm1(x), shift_a, scale_a), grid=grid, state=state)
        x = x + gate_m * self.mlp(modulate(self.norm2(x), shift_m, scale_m))
        return x  # [B, N, D]


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # [B, N, D] -> [B, N, p*p*C]
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class MultiViewDiT(MultiViewBackbone, ModelMixin, ConfigMixin):
    """DiT over all views' tokens, timestep-conditioned by adaLN-Zero, cameras as input channels.

    Cameras enter by concatenating the 7 camera channels to x_t before one shared patch embed,
    rather than through a second camera patch embed summed in: a conv over concatenated channels
    *is* the sum of two convs over the channel groups, so a separate embed would only add a bias.

    Positions: `pos_embed` is the 2D position inside a view, shared by all views (fixed sincos, or
    learned and initialised from sincos, which ties the model to `sample_size`). `view_embed`
    optionally adds a per-view-index embedding; it defaults to "none" because views are an
    unordered set already told apart by their Plücker rays and mask, and an index embedding would
    break equivariance to reordering the target views.

    `cross_view` is one bool for every block or a list with one per block (False = attention
    within each view only).
    """

    _supports_gradient_checkpointing = True
    per_view_config = {"cross_view": False}
    # what a preset or an override may set on a model initialised from a checkpoint (an override
    # may also set `num_heads`, which no shape tells, and `sample_size`: see backbones.init_dit)
    init_overridable = ("cross_view", "qk_norm", "view_embed", "max_views", "pos_embed")

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int | None = None,
        sample_size: int = 32,
        patch_size: int = 2,
        hidden_size: int = 128,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        qk_norm: bool = True,
        cross_view: bool | list[bool] = True,
        pos_embed: Literal["sincos", "learned"] = "sincos",
        view_embed: Literal["none", "sincos", "learned"] = "none",
        max_views: int = 16,
        frequency_embedding_size: int = 256,
    ):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        flags = [cross_view] * depth if isinstance(cross_view, bool) else list(cross_view)
        if len(flags) != depth or not all(isinstance(f, bool) for f in flags):
            raise ValueError(f"cross_view must be a bool or a list of {depth} bools, got {cross_view!r}")
        if pos_embed not in ("sincos", "learned"):
            raise ValueError(f"pos_embed must be 'sincos' or 'learned', got {pos_embed!r}")
        if view_embed not in ("none", "sincos", "learned"):
            raise ValueError(f"view_embed must be 'none', 'sincos' or 'learned', got {view_embed!r}")
        if hidden_size % 4:
            raise ValueError(f"hidden_size must be divisible by 4 for the 2D sincos embedding, got {hidden_size}")
        if sample_size % patch_size:
            raise ValueError(f"sample_size {sample_size} is not divisible by patch_size {patch_size}")
        self.gradient_checkpointing = False

        self.patch_embed = PatchEmbed(
            img_size=sample_size, patch_size=patch_size, in_chans=in_channels + CAMERA_CHANNELS,
            embed_dim=hidden_size, strict_img_size=False,
        )
        self.base_grid = sample_size // patch_size  # sincos positions are integers at this grid
        if pos_embed == "learned":
            self.pos_embedding = nn.Parameter(self._sincos_2d(self.base_grid, self.base_grid))  # [n, D]
        else:
            self.pos_embedding = None
        learned_views = view_embed == "learned"
        self.view_embedding = nn.Parameter(torch.zeros(max_views, hidden_size)) if learned_views else None
        self.time_proj = Timesteps(frequency_embedding_size, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.t_embedder = TimestepEmbedding(frequency_embedding_size, hidden_size)

        width = max(2, len(str(depth - 1)))
        self.attention_names = [f"blocks.{i:0{width}d}.attn" for i in range(depth)]
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm=qk_norm, cross_view=flag, layer_name=name)
            for flag, name in zip(flags, self.attention_names)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation; the zeroed adaLN and output make every block start as identity
        and the model start by predicting 0 (tests that need non-trivial outputs re-randomise)."""
        def xavier(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(xavier)
        w = self.patch_embed.proj.weight  # initialised like a linear layer over a flattened patch
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        if self.view_embedding is not None:
            nn.init.normal_(self.view_embedding, std=0.02)
        nn.init.normal_(self.t_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(self.t_embedder.linear_2.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # ---- the attention-exposure interface --------------------------------------------------------
    def attention_layers(self) -> list[AttentionLayer]:
        """One layer per block, all of stage `blocks`: the DiT is isotropic (same grid, no skips
        between halves), so splitting it into "encoder" and "decoder" would invent a structure."""
        return [
            AttentionLayer(
                name=block.attn.layer_name, cross_view=block.attn.cross_view, num_heads=block.attn.heads,
                head_dim=block.attn.head_dim, stride=self.config.patch_size, index=i, stage="blocks",
            )
            for i, block in enumerate(self.blocks)
        ]

    def attention_module(self, name: str) -> nn.Module:
        if name not in self.attention_names:
            raise UnknownLayerError(name, list(self.attention_names))
        return self.blocks[self.attention_names.index(name)].attn

    # ---- forward -----------------------------------------------------------------------------------
    sincos_positions = staticmethod(sincos_2d)  # for initialisers, which must not import this module

    def _sincos_2d(self, h: int, w: int, device=None) -> torch.Tensor:  # [h*w, D], row-major
        return sincos_2d(self.config.hidden_size, h, w, self.base_grid, device)

    def _positions(self, h: int, w: int, device) -> torch.Tensor:  # [h*w, D]
        if self.pos_embedding is None:
            return self._sincos_2d(h, w, device)
        if (h, w) != (self.base_grid, self.base_grid):
            raise ValueError(
                f"pos_embed='learned' was built for a {self.base_grid}x{self.base_grid} token grid "
                f"(sample_size {self.config.sample_size}), got {h}x{w}; use pos_embed='sincos' for other sizes"
            )
        return self.pos_embedding

    def _view_positions(self, num_views: int, device) -> torch.Tensor | None:  # [V, D]
        if self.config.view_embed == "learned":
            if num_views > self.config.max_views:
                raise ValueError(f"view_embed='learned' holds {self.config.max_views} views, got {num_views}")
            return self.view_embedding[:num_views]
        if self.config.view_embed == "sincos":
            index = torch.arange(num_views, device=device, dtype=torch.float32)
            return get_1d_sincos_pos_embed_from_grid(self.config.hidden_size, index, output_type="pt").float()
        return None

    def size_multiple(self) -> tuple[int, str]:
        return self.config.patch_size, f"patch_size {self.config.patch_size}"

    def _denoise(self, x_t: torch.Tensor, t: torch.Tensor, cam: torch.Tensor, state: TapState) -> torch.Tensor:
        B, V, C, H, W = x_t.shape
        p = self.config.patch_size
        h, w = H // p, W // p
        grid = (V, h, w)

        x = rearrange(torch.cat([x_t, cam], dim=2), "b v c h w -> (b v) c h w")  # [(B V), C+7, H, W]
        x = self.patch_embed(x) + self._positions(h, w, x.device).to(x.dtype)  # [(B V), h*w, D]
        x = rearrange(x, "(b v) n d -> b v n d", b=B)
        view_pos = self._view_positions(V, x.device)
        if view_pos is not None:
            x = x + view_pos.to(x.dtype)[None, :, None]  # [V, D] broadcast over batch and tokens
        x = rearrange(x, "b v n d -> b (v n) d")  # [B, N, D] view-major

        c = self.t_embedder(self.time_proj(t.to(x.device)).to(x.dtype))  # [B, D]
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, c, grid, state)  # non-reentrant (diffusers)
            else:
                x = block(x, c, grid, state)  # [B, N, D]
        x = self.final_layer(x, c)  # [B, N, p*p*C_out]
        return rearrange(
            x, "b (v h w) (p q c) -> b v c (h p) (w q)", v=V, h=h, w=w, p=p, q=p
        )  # [B, V, C_out, H, W]

    # ---- DiT-checkpoint initialisation (mapping in backbones.init_dit) ------------------------------
    @classmethod
    def _from_foreign(cls, path, defaults, defaults_from, overrides) -> "MultiViewDiT":
        from backbones import init_dit

        return init_dit.from_dit_checkpoint(cls, path, defaults, defaults_from, overrides)


# Presets are data: the micro/tiny/small ones work in pixel space on CPU, the DiT sizes on latents.
_DIT_SIZE = dict(in_channels=4, sample_size=32, patch_size=2)  # 256 px images -> 32x32x4 latents
register_backbone(
    "mv_dit",
    presets={
        "micro": dict(in_channels=3, sample_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2),
        "tiny": dict(in_channels=3, sample_size=32, patch_size=2, hidden_size=128, depth=4, num_heads=4),
        "small": dict(in_channels=3, sample_size=32, patch_size=2, hidden_size=192, depth=6, num_heads=4),
        "B/2": dict(_DIT_SIZE, hidden_size=768, depth=12, num_heads=12),
        "L/2": dict(_DIT_SIZE, hidden_size=1024, depth=24, num_heads=16),
        "XL/2": dict(_DIT_SIZE, hidden_size=1152, depth=28, num_heads=16),
    },
)(MultiViewDiT)
