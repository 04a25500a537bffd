"""Initialising `mv_dit` from a facebookresearch/DiT checkpoint: architecture from the shapes, renamed weights.

A DiT checkpoint (`.pt` as DiT's train.py or the released `DiT-XL-2-256x256.pt` write it, or
`.safetensors`) has no config, so the architecture is read off its tensors:
  - hidden size D, input channels C, patch size p: `x_embedder.proj.weight` [D, C, p, p];
  - depth: the number of `blocks.N.`; MLP ratio: `blocks.0.mlp.fc1.weight` [D * ratio, D];
  - frequency embedding size: `t_embedder.mlp.0.weight` [D, F] (DiT: 256);
  - sample size: `pos_embed` [1, (S/p)^2, D], so S = p * sqrt(tokens);
  - learned sigma: `final_layer.linear.weight` has p*p*2C rows instead of p*p*C;
  - heads: not in any shape. DiT's sizes fix them (S: 384 -> 6, B: 768 -> 12, L: 1024 -> 16,
    XL: 1152 -> 16, i.e. head_dim 64 except XL's 72); any other width uses head_dim 64 when D is
    a multiple of 64, and otherwise needs `num_heads=` passed explicitly (it may always be).
An override `sample_size=` moves the base grid of the sincos positions (the size a DiT rebuilt
for that input size would use); every other architecture override must repeat the source's value.
The weights are then mapped so that one view of the loaded model computes DiT's forward with the
null class (tests/test_pretrained_dit.py checks it against DiT written out from the paper):
  - `blocks.N.attn.qkv` is split into to_q/to_k/to_v (rows q | k | v, as timm's Attention reads
    them); `attn.proj` -> `attn.to_out`; the MLP, adaLN and final-layer names are DiT's own;
  - `t_embedder.mlp.0/2` -> `t_embedder.linear_1/2` (diffusers' TimestepEmbedding: the same
    Linear-SiLU-Linear, and `Timesteps(F, flip_sin_to_cos=True, shift 0)` is DiT's
    cos|sin embedding with max_period 10000, to the bit);
  - the class embedding of the CFG null label (row `num_classes`, the table's last) is folded
    into `t_embedder.linear_2.bias`: DiT's conditioning is c = t_emb + y_emb and this model has
    no class input, so it is the unconditional DiT;
  - the patch embedding is zero-padded for the 7 camera channels (cameras start inert);
  - of a learned-sigma final layer only the epsilon rows are kept (the sigma rows are dropped:
    the objective here predicts noise, v or x0, never a variance);
  - `pos_embed` is DiT's fixed 2D sincos, which this model computes itself ('sincos', equal to
    the bit at the checkpoint's grid); a checkpoint whose `pos_embed` differs loads as 'learned';
  - no q/k norm (DiT has none), no view embedding.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from backbones.checkpoints import (
    CheckpointMismatchError,
    build,
    check_keys,
    merge_init_config,
    read_source,
    warn_not_source,
    wrong_kind_error,
)
DIT_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}  # DiT-S, -B, -L, -XL (models.py)
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_BLOCK_PARTS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")
_TOP = ("x_embedder.proj", "t_embedder.mlp.0", "t_embedder.mlp.2", "final_layer.linear",
        "final_layer.adaLN_modulation.1")


def dit_architecture(sd: dict[str, torch.Tensor], file: Path, num_heads: int | None) -> dict[str, Any]:
    """`MultiViewDiT` keywords read off a DiT state dict's shapes (see the module docstring)."""
    D, C, p, _ = sd["x_embedder.proj.weight"].shape
    depth = len({int(m.group(1)) for k in sd if (m := _BLOCK.match(k))})
    hidden = sd["blocks.0.mlp.fc1.weight"].shape[0] if depth else 4 * D
    tokens = sd["pos_embed"].shape[-2] if "pos_embed" in sd else 0
    grid = math.isqrt(tokens)
    if grid * grid != tokens or grid == 0:
        raise CheckpointMismatchError(f"init_from {file}: pos_embed {tuple(sd['pos_embed'].shape)} is not a square grid")
    c_out = sd["final_layer.linear.weight"].shape[0] // (p * p)
    if c_out not in (C, 2 * C):
        raise CheckpointMismatchError(
            f"init_from {file}: final_layer.linear has {c_out} channels per pixel; DiT has {C} or {2 * C} (learned sigma)")
    if num_heads is None:
        num_heads = DIT_HEADS.get(D, D // 64 if D % 64 == 0 else None)
        if num_heads is None:
            raise CheckpointMismatchError(
                f"init_from {file}: cannot tell the number of heads of a hidden size {D} DiT from its shapes "
                f"(DiT sizes: {DIT_HEADS}, otherwise head_dim 64); pass num_heads=...")
    return dict(
        in_channels=C, out_channels=C, sample_size=grid * p, patch_size=p, hidden_size=D, depth=depth,
        num_heads=num_heads, mlp_ratio=hidden / D, qk_norm=False, cross_view=True,
        pos_embed="sincos", view_embed="none", frequency_embedding_size=sd["t_embedder.mlp.0.weight"].shape[1],
    )


def dit_keys(depth: int) -> list[str]:
    """Every key of the official layout for `depth` blocks (y_embedder is optional: a DiT
    without classes has none)."""
    names = [f"{m}.{w}" for m in _TOP for w in ("weight", "bias")] + ["pos_embed"]
    names += [f"blocks.{i}.{part}.{w}" for i in range(depth) for part in _BLOCK_PARTS for w in ("weight", "bias")]
    return names


def convert(sd: dict[str, torch.Tensor], depth: int, C: int, camera_channels: int) -> dict[str, torch.Tensor]:
    """DiT keys -> MultiViewDiT keys (pos_embed is handled by the caller)."""
    w = sd["x_embedder.proj.weight"]  # [D, C, p, p]
    out = {
        "patch_embed.proj.weight": torch.cat([w, w.new_zeros(w.shape[0], camera_channels, *w.shape[2:])], 1),
        "patch_embed.proj.bias": sd["x_embedder.proj.bias"],
        "t_embedder.linear_1.weight": sd["t_embedder.mlp.0.weight"],
        "t_embedder.linear_1.bias": sd["t_embedder.mlp.0.bias"],
        "t_embedder.linear_2.weight": sd["t_embedder.mlp.2.weight"],
        "t_embedder.linear_2.bias": sd["t_embedder.mlp.2.bias"].float(),
    }
    if "y_embedder.embedding_table.weight" in sd:  # c = t_emb + y_emb(null class): fold y into the bias
        out["t_embedder.linear_2.bias"] = out["t_embedder.linear_2.bias"] + sd["y_embedder.embedding_table.weight"][-1].float()
    for i in range(depth):
        b = f"blocks.{i}."
        for name in ("weight", "bias"):
            q, k, v = sd[f"{b}attn.qkv.{name}"].chunk(3, dim=0)  # rows: q | k | v
            out.update({f"{b}attn.to_q.{name}": q, f"{b}attn.to_k.{name}": k, f"{b}attn.to_v.{name}": v})
            out[f"{b}attn.to_out.{name}"] = sd[f"{b}attn.proj.{name}"]
            for part in ("mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
                out[f"{b}{part}.{name}"] = sd[f"{b}{part}.{name}"]
    p2 = w.shape[2] * w.shape[3]
    lw, lb = sd["final_layer.linear.weight"], sd["final_layer.linear.bias"]  # rows ordered (p q c)
    out["final_layer.linear.weight"] = lw.view(p2, -1, lw.shape[-1])[:, :C].reshape(p2 * C, lw.shape[-1])
    out["final_layer.linear.bias"] = lb.view(p2, -1)[:, :C].reshape(p2 * C)  # epsilon rows only
    for name in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{name}"] = sd[f"final_layer.adaLN_modulation.1.{name}"]
    return out


def from_dit_checkpoint(cls: type, path: Path, defaults: dict[str, Any], defaults_from: str,
                        overrides: dict[str, Any]):
    source = read_source(path)
    if source.kind() != "dit":
        raise wrong_kind_error(source, cls, expected="dit")
    sd, file = source.state_dict, source.weights_file
    overrides = dict(overrides)
    arch = dit_architecture(sd, file, overrides.pop("num_heads", None))
    expected = dict.fromkeys(dit_keys(arch["depth"]))
    expected = {k: sd.get(k, torch.empty(0)) for k in expected}
    found = {k: v for k, v in sd.items() if k != "y_embedder.embedding_table.weight"}
    check_keys(file, expected, found)

    positions = sd["pos_embed"].reshape(-1, arch["hidden_size"]).float()  # [n, D]
    grid = arch["sample_size"] // arch["patch_size"]
    if not torch.allclose(positions, cls.sincos_positions(arch["hidden_size"], grid, grid, grid), atol=1e-5, rtol=0):
        arch["pos_embed"] = "learned"  # trained or otherwise non-standard positions: keep them
    if "sample_size" in overrides and arch["pos_embed"] == "sincos":
        # the base grid of the sincos positions: the engine passes the size it trains at, and a
        # DiT rebuilt at another size computes its sincos positions at that size's grid
        arch["sample_size"] = overrides.pop("sample_size")
    config = merge_init_config(cls, arch, str(file), defaults, defaults_from, overrides)
    model = build(cls, config, str(file), defaults, defaults_from)

    camera_channels = model.patch_embed.proj.in_channels - arch["in_channels"]  # the 7 camera channels
    weights = convert(sd, arch["depth"], arch["in_channels"], camera_channels)
    if config["pos_embed"] == "learned":
        weights["pos_embedding"] = positions  # the checkpoint's positions, sincos or not
    elif arch["pos_embed"] == "learned":
        warn_not_source(cls, "pos_embed='sincos' replaces the checkpoint's non-sincos positions")
    if model.view_embedding is not None:
        weights["view_embedding"] = torch.zeros_like(model.view_embedding)  # learned: starts as a no-op
    elif config["view_embed"] == "sincos":
        warn_not_source(cls, "view_embed='sincos' adds a fixed per-view embedding")
    fresh = model.fresh_keys_ok(config, arch)
    check_keys(file, model.state_dict(), weights, fresh_ok=fresh)
    if fresh:
        warn_not_source(cls, "qk_norm=True adds fresh q/k LayerNorms")
    model.load_state_dict(weights, strict=not fresh)
    return model
