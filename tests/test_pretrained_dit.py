"""mv_dit initialised from a facebookresearch/DiT checkpoint is DiT, per view.

The reference is DiT's forward written out below from the paper (Peebles & Xie 2023, and DiT's
models.py for the conventions): patchify, MAE's 2D sincos positions, the sinusoidal timestep
embedding (cos | sin, max_period 10000) through a Linear-SiLU-Linear, class embedding added to
the conditioning, adaLN-Zero blocks (shift/scale/gate for attention and MLP), the final adaLN
layer, unpatchify. It uses none of the project's code and reads the checkpoint in DiT's own key
layout, which the tests write as micro state dicts (.pt and .safetensors); nothing is downloaded.
"""
from __future__ import annotations

import argparse
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from backbones import create_backbone

C, P, GRID, CLASSES = 4, 2, 4, 10  # latent channels, patch, tokens per side, classes (+1 null row)
SIZE = P * GRID


# ---- DiT from the paper -------------------------------------------------------------------------
def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:  # [M] -> [M, dim]: sin | cos
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos.double().reshape(-1)[:, None] * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:  # [grid*grid, dim], row-major tokens
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, xs), sincos_1d(dim // 2, ys)], dim=1).float()  # MAE: w first


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


def linear(x, sd, name):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


def layer_norm(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def dit_forward(sd: dict, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, num_heads: int) -> torch.Tensor:
    """DiT(x [N, C, H, W], t [N], y [N]) -> [N, C_out, H, W] (C_out = 2C with learned sigma)."""
    D, c_in, p, _ = sd["x_embedder.proj.weight"].shape
    N, _, H, W = x.shape
    h, w = H // p, W // p
    patches = x.reshape(N, c_in, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(N, h * w, c_in * p * p)
    tokens = patches @ sd["x_embedder.proj.weight"].reshape(D, -1).T + sd["x_embedder.proj.bias"]
    tokens = tokens + sd["pos_embed"][0].to(x.dtype)  # [N, T, D]
    temb = timestep_embedding(t).to(x.dtype)
    temb = linear(F.silu(linear(temb, sd, "t_embedder.mlp.0")), sd, "t_embedder.mlp.2")
    c = temb + sd["y_embedder.embedding_table.weight"][y]  # [N, D]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        b = f"blocks.{i}."
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = linear(F.silu(c), sd, b + "adaLN_modulation.1").chunk(6, -1)
        a = modulate(layer_norm(tokens), shift_a, scale_a)
        q, k, v = linear(a, sd, b + "attn.qkv").reshape(N, h * w, 3, num_heads, D // num_heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-1, -2) / math.sqrt(D // num_heads)).softmax(-1) @ v  # [N, heads, T, d]
        tokens = tokens + gate_a[:, None] * linear(attn.transpose(1, 2).reshape(N, h * w, D), sd, b + "attn.proj")
        m = modulate(layer_norm(tokens), shift_m, scale_m)
        mlp = linear(F.gelu(linear(m, sd, b + "mlp.fc1"), approximate="tanh"), sd, b + "mlp.fc2")
        tokens = tokens + gate_m[:, None] * mlp
    shift, scale = linear(F.silu(c), sd, "final_layer.adaLN_modulation.1").chunk(2, -1)
    out = linear(modulate(layer_norm(tokens), shift, scale), sd, "final_layer.linear")  # [N, T, p*p*C_out]
    c_out = out.shape[-1] // (p * p)
    out = out.reshape(N, h, w, p, p, c_out).permute(0, 5, 1, 3, 2, 4)  # nhwpqc -> nchpwq
    return out.reshape(N, c_out, H, W)


# ---- a micro DiT checkpoint in the official layout ------------------------------------------------
def dit_state_dict(D=128, depth=2, learn_sigma=True, seed=0, pos=None) -> dict[str, torch.Tensor]:
    """Random weights (no zeros: adaLN-Zero's zero init would make every check trivial)."""
    gen = torch.Generator().manual_seed(seed)
    c_out = 2 * C if learn_sigma else C

    def r(*shape, std=0.05):
        return torch.randn(*shape, generator=gen) * std

    sd = {
        "x_embedder.proj.weight": r(D, C, P, P, std=0.3), "x_embedder.proj.bias": r(D),
        "t_embedder.mlp.0.weight": r(D, 256, std=0.1), "t_embedder.mlp.0.bias": r(D),
        "t_embedder.mlp.2.weight": r(D, D, std=0.1), "t_embedder.mlp.2.bias": r(D),
        "y_embedder.embedding_table.weight": r(CLASSES + 1, D, std=0.3),
        "pos_embed": (sincos_2d(D, GRID) if pos is None else pos)[None],
        "final_layer.linear.weight": r(P * P * c_out, D, std=0.04), "final_layer.linear.bias": r(P * P * c_out),
        "final_layer.adaLN_modulation.1.weight": r(2 * D, D), "final_layer.adaLN_modulation.1.bias": r(2 * D),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({
            b + "attn.qkv.weight": r(3 * D, D, std=0.15), b + "attn.qkv.bias": r(3 * D),
            b + "attn.proj.weight": r(D, D, std=0.1), b + "attn.proj.bias": r(D),
            b + "mlp.fc1.weight": r(4 * D, D, std=0.1), b + "mlp.fc1.bias": r(4 * D),
            b + "mlp.fc2.weight": r(D, 4 * D, std=0.1), b + "mlp.fc2.bias": r(D),
            b + "adaLN_modulation.1.weight": r(6 * D, D, std=0.1), b + "adaLN_modulation.1.bias": r(6 * D, std=0.3),
        })
    return sd


def write(sd: dict, path, fmt: str):
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif fmt == "pt":
        torch.save(sd, path)
    else:  # DiT's train.py checkpoint: {"model", "ema", "opt", "args"}; DiT samples with the EMA
        noise = {k: v + 1.0 for k, v in sd.items()}
        torch.save({"model": noise, "ema": sd, "opt": {}, "args": argparse.Namespace(model="DiT-micro")}, path)
    return path


def cameras(B: int, V: int = 1, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    c2w = torch.eye(4).repeat(B, V, 1, 1)
    c2w[..., :3, 3] = torch.randn(B, V, 3, generator=gen)
    K = torch.tensor([[1.2 * SIZE, 0, (SIZE - 1) / 2], [0, 1.2 * SIZE, (SIZE - 1) / 2], [0, 0, 1.0]])
    cond_mask = torch.tensor([[0.0], [1.0]]).repeat(B // 2 + 1, V)[:B]  # references and targets
    return dict(cam2world=c2w, intrinsics=K.expand(B, V, 3, 3).clone(), cond_mask=cond_mask)


def one_view(model, x, t, seed=0):
    with torch.no_grad():
        return model(x[:, None], t, **cameras(x.shape[0], seed=seed)).sample[:, 0]


def reference(sd, x, t, num_heads):
    null = torch.full((x.shape[0],), CLASSES)  # the CFG null class: the model has no class input
    with torch.no_grad():
        return dit_forward(sd, x, t, null, num_heads)[:, :C]  # epsilon channels; sigma dropped


def batch(B=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, SIZE, SIZE, generator=gen), torch.tensor([0, 17, 500, 999])[:B]


# ---- equivalence ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["pt", "safetensors", "train_checkpoint"])
def test_one_view_equals_dit_with_the_null_class(tmp_path, fmt):
    sd = dit_state_dict()
    path = write(sd, tmp_path / f"dit.{'safetensors' if fmt == 'safetensors' else 'pt'}", fmt)
    model = create_backbone("mv_dit", init_from=str(path)).eval()
    x, t = batch()
    ours, theirs = one_view(model, x, t), reference(sd, x, t, num_heads=2)  # D 128: head_dim 64
    assert 0.1 < theirs.abs().mean() < 1  # a non-trivial output, of the size a denoiser predicts
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_architecture_comes_from_the_shapes(tmp_path, learn_sigma):
    sd = dit_state_dict(D=192, depth=3, learn_sigma=learn_sigma)
    model = create_backbone("mv_dit", "tiny", init_from=str(write(sd, tmp_path / "d.pt", "pt")))
    cfg = model.config  # the tiny preset's architecture is ignored: the checkpoint decides
    assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.patch_size) == (192, 3, 3, P)
    assert (cfg.in_channels, cfg.out_channels, cfg.sample_size, cfg.mlp_ratio) == (C, C, SIZE, 4.0)
    assert cfg.qk_norm is False and cfg.pos_embed == "sincos" and cfg.view_embed == "none"
    x, t = batch(2)
    torch.testing.assert_close(one_view(model.eval(), x, t), reference(sd, x, t, 3), atol=1e-5, rtol=1e-5)


def test_heads_can_be_given_when_the_shapes_cannot_tell(tmp_path):
    sd = dit_state_dict(D=96)
    path = str(write(sd, tmp_path / "d.pt", "pt"))
    with pytest.raises(ValueError, match=r"d\.pt: cannot tell the number of heads.*pass num_heads"):
        create_backbone("mv_dit", init_from=path)
    model = create_backbone("mv_dit", init_from=path, num_heads=4).eval()
    x, t = batch(2)
    torch.testing.assert_close(one_view(model, x, t), reference(sd, x, t, 4), atol=1e-5, rtol=1e-5)


def test_cameras_and_mask_are_inert_at_init(tmp_path):
    model = create_backbone("mv_dit", init_from=str(write(dit_state_dict(), tmp_path / "d.pt", "pt"))).eval()
    x, t = batch()
    assert torch.equal(one_view(model, x, t, seed=0), one_view(model, x, t, seed=5))
    w = model.patch_embed.proj.weight  # [D, C + 7, p, p]: the camera channels are zero
    assert w.shape[1] == C + 7 and not w[:, C:].any()


def test_non_sincos_positions_load_as_learned(tmp_path):
    pos = torch.randn(GRID * GRID, 128, generator=torch.Generator().manual_seed(3))
    sd = dit_state_dict(pos=pos)
    model = create_backbone("mv_dit", init_from=str(write(sd, tmp_path / "d.pt", "pt"))).eval()
    assert model.config.pos_embed == "learned" and torch.equal(model.pos_embedding, pos)
    x, t = batch(2)
    torch.testing.assert_close(one_view(model, x, t), reference(sd, x, t, 2), atol=1e-5, rtol=1e-5)


def test_multi_view_overrides_keep_the_start_and_qk_norm_says_it_does_not(tmp_path):
    sd = dit_state_dict()
    path = str(write(sd, tmp_path / "d.pt", "pt"))
    x, t = batch(2)
    learned = create_backbone("mv_dit", init_from=path, view_embed="learned", cross_view=[True, False]).eval()
    assert not learned.view_embedding.any()  # zero: a no-op until trained
    torch.testing.assert_close(one_view(learned, x, t), reference(sd, x, t, 2), atol=1e-5, rtol=1e-5)
    with pytest.warns(UserWarning, match="fresh q/k LayerNorms"):
        normed = create_backbone("mv_dit", init_from=path, qk_norm=True).eval()
    assert (one_view(normed, x, t) - reference(sd, x, t, 2)).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"override hidden_size=64 conflicts with the source \(hidden_size=128\)"):
        create_backbone("mv_dit", init_from=path, hidden_size=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # repeating a source value (the engine passes in_channels) is fine
        create_backbone("mv_dit", init_from=path, in_channels=C)


def test_save_pretrained_folder_initialises_the_same_model(tmp_path):
    loaded = create_backbone("mv_dit", init_from=str(write(dit_state_dict(), tmp_path / "d.pt", "pt"))).eval()
    loaded.save_pretrained(tmp_path / "ours")
    again = create_backbone("mv_dit", "micro", init_from=str(tmp_path / "ours")).eval()
    x, t = batch(2)
    assert torch.equal(one_view(again, x, t), one_view(loaded, x, t))
    assert create_backbone("mv_dit", init_from="").config.hidden_size == 128  # "" = random init (tiny)
