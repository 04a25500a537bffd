"""What is specific to the multi-view DiT: sizes, positional/view embeddings, q/k norm, DiT init.

The registry-wide attention contract lives in test_backbone_contract.py.
"""
from __future__ import annotations

import pytest
import torch

from backbones import TapRequest, UnknownLayerError, create_backbone, list_presets
from backbones.mv_dit import CAMERA_CHANNELS
from test_backbone_contract import SIZE, inputs, micro, run


def dit_param_count(cfg: dict) -> int:
    """DiT's architecture written out by hand (DiT models.py), as an independent reference."""
    D, depth, p = cfg["hidden_size"], cfg["depth"], cfg["patch_size"]
    c_in = cfg["in_channels"]
    c_out = cfg.get("out_channels") or c_in
    head_dim, mlp = D // cfg["num_heads"], int(D * cfg.get("mlp_ratio", 4.0))
    freq = cfg.get("frequency_embedding_size", 256)
    patch_embed = (c_in + CAMERA_CHANNELS) * p * p * D + D
    t_embed = freq * D + D + D * D + D
    block = (
        4 * (D * D + D)  # q, k, v, out
        + (4 * head_dim if cfg.get("qk_norm", True) else 0)  # LayerNorm(head_dim) on q and k
        + D * mlp + mlp + mlp * D + D  # Mlp
        + D * 6 * D + 6 * D  # adaLN-Zero modulation
    )
    final = D * 2 * D + 2 * D + D * p * p * c_out + p * p * c_out
    learned_pos = (cfg["sample_size"] // p) ** 2 * D if cfg.get("pos_embed") == "learned" else 0
    return patch_embed + t_embed + depth * block + final + learned_pos


def meta_count(preset: str, **overrides) -> tuple[int, dict]:
    with torch.device("meta"):  # paper sizes are never materialised in tests
        model = create_backbone("mv_dit", preset, **overrides)
    return sum(p.numel() for p in model.parameters()), dict(model.config)


@pytest.mark.parametrize("preset", ["micro", "tiny", "small", "B/2", "L/2", "XL/2"])
def test_preset_sizes_match_the_dit_architecture(preset):
    count, cfg = meta_count(preset)
    assert count == dit_param_count(cfg)


@pytest.mark.parametrize("preset, dit_millions", [("B/2", 130), ("L/2", 458), ("XL/2", 675)])
def test_paper_presets_have_dit_sizes(preset, dit_millions):
    count, cfg = meta_count(preset)
    assert (cfg["hidden_size"], cfg["patch_size"], cfg["in_channels"]) == (
        {"B/2": 768, "L/2": 1024, "XL/2": 1152}[preset], 2, 4,
    )
    # DiT's counts include a 1001-class label embedding and a learned-sigma output (8 channels);
    # ours has neither, which is all of the difference.
    dit_extras = 1001 * cfg["hidden_size"] + cfg["hidden_size"] * 2 * 2 * 4 + 2 * 2 * 4
    assert (count + dit_extras) / 1e6 == pytest.approx(dit_millions, rel=0.005)


def test_tiny_and_micro_sizes_are_cpu_sized():
    assert meta_count("micro")[0] < 100_000  # notes: ~53 k
    assert 1.0e6 < meta_count("tiny")[0] < 2.0e6  # notes: ~1.3 M
    assert set(list_presets("mv_dit")) == {"micro", "tiny", "small", "B/2", "L/2", "XL/2"}


def test_fresh_model_predicts_zero_like_dit():
    """adaLN-Zero and the zeroed output layer: every block starts as identity, the output as 0."""
    torch.manual_seed(0)
    model = create_backbone("mv_dit", "micro").eval()
    with torch.no_grad():
        out = run(model, inputs(model))
    assert torch.equal(out.sample, torch.zeros_like(out.sample))


def test_layer_names_are_stable_and_zero_padded():
    model = create_backbone("mv_dit", "micro", depth=12, cross_view=[i % 2 == 0 for i in range(12)])
    layers = model.attention_layers()
    assert [layer.name for layer in layers] == [f"blocks.{i:02d}.attn" for i in range(12)]
    assert [layer.cross_view for layer in layers] == [i % 2 == 0 for i in range(12)]
    assert {(layer.stride, layer.num_heads, layer.head_dim) for layer in layers} == {(2, 2, 16)}
    with pytest.raises(ValueError, match="cross_view"):
        create_backbone("mv_dit", "micro", cross_view=[True])


def test_every_block_is_stage_blocks_and_selectors_pick_by_order_and_view_mixing():
    model = create_backbone("mv_dit", "tiny", cross_view=[False, True, True, False])
    assert model.stages() == ["blocks"]
    assert {layer.stage for layer in model.attention_layers()} == {"blocks"}
    expected = {
        "first": "blocks.00.attn", "blocks:last": "blocks.03.attn",
        "first_cross_view": "blocks.01.attn", "blocks:last_cross_view": "blocks.02.attn",
        "depth:0.5": "blocks.02.attn",  # 4 blocks: round(0.5 * 3) = 2, what the quickstart supervises
        "1/2": "blocks.00.attn", "blocks:1/2": "blocks.00.attn",
    }
    assert {selector: model.resolve_layer(selector) for selector in expected} == expected
    with torch.device("meta"):
        xl = create_backbone("mv_dit", "XL/2")
    assert xl.resolve_layer("1/16", input_stride=8) == "blocks.00.attn"  # 2x2 patches of 8x latents
    assert xl.resolve_layer("depth:0.25") == "blocks.07.attn"  # round(0.25 * 27) = 7
    with pytest.raises(UnknownLayerError, match=r"'decoder' is neither a stage.*stages of this model: \['blocks'\]"):
        model.resolve_layer("decoder:first_cross_view")  # the DiT has no decoder, and does not pretend to
    with pytest.raises(UnknownLayerError, match="its grids are at 1/2"):
        model.resolve_layer("1/4")
    with pytest.raises(UnknownLayerError, match="has no cross-view layer"):
        create_backbone("mv_dit", "micro", cross_view=False).resolve_layer("first_cross_view")


def test_learned_positions_start_equal_to_sincos_and_are_trained():
    fixed, learned = micro("mv_dit").eval(), micro("mv_dit", pos_embed="learned").eval()
    assert "pos_embedding" in dict(learned.named_parameters())
    assert not any("pos_embed" in k for k in fixed.state_dict())
    batch = inputs(fixed)
    with torch.no_grad():
        torch.testing.assert_close(run(learned, batch).sample, run(fixed, batch).sample)
    run(learned.train(), batch).sample.square().mean().backward()
    assert learned.pos_embedding.grad.abs().sum() > 0


def test_learned_positions_are_tied_to_the_sample_size_but_sincos_is_not():
    fixed, learned = micro("mv_dit"), micro("mv_dit", pos_embed="learned")
    big = {k: v for k, v in inputs(fixed).items()}
    big["x_t"] = torch.randn(2, 3, 3, 2 * SIZE, 2 * SIZE)
    assert run(fixed, big).sample.shape == big["x_t"].shape
    with pytest.raises(ValueError, match="pos_embed='learned'.*4x4.*8x8"):
        run(learned, big)


def _swap_targets(batch: dict) -> dict:
    order = [0, 2, 1]  # keep the reference first, swap the two targets
    return {k: (v[:, order] if k != "t" else v) for k, v in batch.items()}


@pytest.mark.parametrize("view_embed, equivariant", [("none", True), ("sincos", False), ("learned", False)])
def test_view_embedding_decides_equivariance_to_view_order(view_embed, equivariant):
    """Without a view-index embedding the views are a set: swapping targets swaps outputs."""
    model = micro("mv_dit", view_embed=view_embed).eval()
    batch = inputs(model)
    with torch.no_grad():
        out = run(model, batch).sample
        swapped = run(model, _swap_targets(batch)).sample[:, [0, 2, 1]]
    assert torch.allclose(swapped, out, atol=1e-5) == equivariant


def test_learned_view_embedding_limits_the_view_count():
    model = micro("mv_dit", view_embed="learned", max_views=2)
    with pytest.raises(ValueError, match="holds 2 views"):
        run(model, inputs(model))


@pytest.mark.parametrize("qk_norm", [True, False])
def test_qk_norm_normalises_each_head_of_the_tapped_q_and_k(qk_norm):
    torch.manual_seed(0)
    model = create_backbone("mv_dit", "micro", qk_norm=qk_norm).eval()  # norms as built: weight 1, bias 0
    attn = model.attention_module("blocks.01.attn")
    assert (attn.norm_q is not None) == qk_norm and (attn.norm_k is not None) == qk_norm
    with torch.no_grad():
        tap = run(model, inputs(model), tap=TapRequest("blocks.01.attn")).tap
    for x in (tap.q, tap.k):  # zero mean, unit variance in each head's d channels
        normalised = torch.allclose(x.mean(-1), torch.zeros(()), atol=1e-5) and torch.allclose(
            x.var(-1, unbiased=False), torch.ones(()), atol=1e-3
        )
        assert normalised == qk_norm


def test_bad_inputs_name_the_offending_key():
    model = micro("mv_dit")
    batch = inputs(model)
    for key, bad in [
        ("cam2world", batch["cam2world"][:, :2]),
        ("intrinsics", batch["intrinsics"][..., :2, :]),
        ("cond_mask", batch["cond_mask"][:, None]),
        ("t", batch["t"][:1]),
    ]:
        with pytest.raises(ValueError, match=f"^{key} must have shape"):
            run(model, {**batch, key: bad})
    with pytest.raises(ValueError, match="channels"):
        run(model, {**batch, "x_t": batch["x_t"][:, :, :2]})
    with pytest.raises(ValueError, match="patch_size"):
        run(model, {**batch, "x_t": batch["x_t"][..., :7, :7]})
