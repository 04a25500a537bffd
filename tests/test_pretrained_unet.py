"""mv_unet initialised from a diffusers SD-format UNet folder is that UNet, per view.

The reference is the stock diffusers `UNet2DConditionModel` the folder was written from, with its
text cross-attention silenced: every attn2 gets a processor that returns zeros, so each
transformer block adds exactly 0 where SD adds the text attention (`h = attn2(norm2(h), text) + h`),
which is what a backbone without text conditioning must compute. Folders are written by
`save_pretrained` in the layouts SD ships (a UNet folder, a pipeline folder's `unet/`, .bin,
sharded safetensors); nothing is downloaded.
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from diffusers import UNet2DConditionModel

from backbones import TapRequest, create_backbone

C, SIZE, TEXT_DIM = 4, 16, 12


class ZeroCrossAttention:
    """attn2 processor: the text cross-attention contributes nothing."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        return torch.zeros_like(hidden_states)


def stock_unet(seed: int = 1, **config) -> UNet2DConditionModel:
    """A random micro UNet in SD's layout: attention at the top two levels, none at the lowest
    (as SD's DownBlock2D), per-level heads, linear projections."""
    torch.manual_seed(seed)
    config = {
        "sample_size": SIZE, "in_channels": C, "out_channels": C, "layers_per_block": 1,
        "block_out_channels": (16, 32, 32),
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "attention_head_dim": (1, 2, 2), "norm_num_groups": 8, "cross_attention_dim": TEXT_DIM,
        "use_linear_projection": True, **config,
    }
    return UNet2DConditionModel(**config).eval()


def silenced(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    unet.set_attn_processor({
        name: ZeroCrossAttention() if ".attn2." in name else proc for name, proc in unet.attn_processors.items()
    })
    return unet


def write(unet: UNet2DConditionModel, root, layout: str):
    if layout == "pipeline_folder":
        unet.save_pretrained(root / "unet")
        (root / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DConditionModel"]}))
    elif layout == "bin":
        unet.save_pretrained(root, safe_serialization=False)
    elif layout == "sharded":
        unet.save_pretrained(root, max_shard_size="100KB")
        assert (root / "diffusion_pytorch_model.safetensors.index.json").is_file()
    else:
        unet.save_pretrained(root)
    return str(root)


def inputs(B=3, V=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, V, C, SIZE, SIZE, generator=gen)
    t = torch.tensor([3, 250, 999])[:B]
    c2w = torch.eye(4).repeat(B, V, 1, 1)
    c2w[..., :3, 3] = torch.randn(B, V, 3, generator=gen)
    K = torch.tensor([[1.2 * SIZE, 0, (SIZE - 1) / 2], [0, 1.2 * SIZE, (SIZE - 1) / 2], [0, 0, 1.0]])
    mask = (torch.arange(B * V) % 2).float().view(B, V)  # references and targets
    return x, t, dict(cam2world=c2w, intrinsics=K.expand(B, V, 3, 3).clone(), cond_mask=mask)


def compare(model, stock, seed=0) -> float:
    """Max |ours - stock| over one view of a batch, after checking the outputs are close."""
    x, t, cams = inputs(seed=seed)
    with torch.no_grad():
        ours = model(x, t, **cams).sample[:, 0]
        theirs = silenced(stock)(x[:, 0], t, encoder_hidden_states=torch.randn(x.shape[0], 5, TEXT_DIM)).sample
    assert theirs.abs().mean() > 0.05
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    return (ours - theirs).abs().max().item()


# ---- equivalence ------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout, upcast", [
    ("unet_folder", False), ("pipeline_folder", True), ("bin", True), ("sharded", False),
])
def test_one_view_equals_the_stock_unet_without_text(tmp_path, layout, upcast):
    stock = stock_unet(upcast_attention=upcast)
    model = create_backbone("mv_unet", init_from=write(stock, tmp_path, layout)).eval()
    assert model.config.upcast_attention is upcast  # honoured, not dropped
    assert all(model.attention_module(n).upcast_attention is upcast for n in model.layer_names())
    compare(model, stock)


def test_architecture_comes_from_config_json_and_multi_view_parts_from_the_preset(tmp_path):
    stock = stock_unet(attention_head_dim=2, layers_per_block=2)  # SD-1.x style: one head count for all
    path = write(stock, tmp_path, "unet_folder")
    model = create_backbone("mv_unet", "tiny", init_from=path).eval()  # tiny: 3 levels, like the source
    cfg = model.config
    assert (cfg.block_out_channels, cfg.layers_per_block, cfg.num_heads) == ((16, 32, 32), 2, 2)
    assert (cfg.in_channels, cfg.norm_num_groups, cfg.attention_levels) == (C, 8, (True, True, False))
    assert cfg.camera_hidden == 32 and cfg.qk_norm is False  # tiny's multi-view part; no q/k norm
    compare(model, stock)
    default = create_backbone("mv_unet", init_from=path)  # no preset: CAT3D*'s 3D attention below the top
    assert default.config.cross_view_levels == (False, True, True)


@pytest.mark.parametrize("injection", ["add", "concat"])
def test_cameras_and_mask_are_inert_at_init(tmp_path, injection):
    stock = stock_unet()
    model = create_backbone("mv_unet", init_from=write(stock, tmp_path, "unet_folder"),
                            camera_injection=injection).eval()
    compare(model, stock)
    x, t, cams = inputs()
    moved = dict(cams, cam2world=cams["cam2world"] + 0.3, cond_mask=1 - cams["cond_mask"])
    with torch.no_grad():
        assert torch.equal(model(x, t, **cams).sample, model(x, t, **moved).sample)


def test_qk_norm_override(tmp_path):
    """Off by default when initialising: fresh LayerNorms on q and k are not a no-op. Asked for,
    they are added (with a warning) and everything else is still SD's."""
    stock = stock_unet()
    path = write(stock, tmp_path, "unet_folder")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compare(create_backbone("mv_unet", init_from=path, qk_norm=False).eval(), stock)
    with pytest.warns(UserWarning, match="fresh q/k LayerNorms"):
        normed = create_backbone("mv_unet", init_from=path, qk_norm=True).eval()
    own, ref = normed.unet.state_dict(), stock.state_dict()
    norms = [k for k in own if ".norm_q." in k or ".norm_k." in k]
    assert norms and all(torch.equal(own[k], ref[k]) for k in own if k not in norms)
    x, t, cams = inputs()
    with torch.no_grad():
        ours = normed(x, t, **cams).sample[:, 0]
        theirs = silenced(stock)(x[:, 0], t, encoder_hidden_states=torch.zeros(3, 1, TEXT_DIM)).sample
    assert (ours - theirs).abs().max() > 1e-3  # why qk_norm is off when initialising


def test_upcast_attention_computes_attention_in_float32(tmp_path):
    for upcast, dtype in ((True, torch.float32), (False, torch.bfloat16)):
        model = create_backbone("mv_unet", init_from=write(stock_unet(upcast_attention=upcast), tmp_path / str(upcast),
                                                          "unet_folder")).to(torch.bfloat16).eval()
        x, t, cams = inputs()
        with torch.no_grad():
            out = model(x.bfloat16(), t, **cams, tap=TapRequest("up.01.attn.00"))
        assert out.sample.dtype == torch.bfloat16 and torch.isfinite(out.sample).all()
        assert out.tap.q.dtype == dtype and out.tap.k.dtype == dtype  # what SDPA was given


def test_save_pretrained_folder_initialises_the_same_model(tmp_path):
    stock = stock_unet()
    loaded = create_backbone("mv_unet", init_from=write(stock, tmp_path / "sd", "unet_folder")).eval()
    loaded.save_pretrained(tmp_path / "ours")
    again = create_backbone("mv_unet", "sd21", init_from=str(tmp_path / "ours")).eval()  # preset: ignored
    fields = lambda m: json.dumps({k: v for k, v in m.config.items() if not k.startswith("_")}, sort_keys=True)  # noqa: E731
    assert fields(again) == fields(loaded)
    x, t, cams = inputs(V=2)
    with torch.no_grad():
        assert torch.equal(again(x, t, **cams).sample, loaded(x, t, **cams).sample)
    per_view = create_backbone("mv_unet", init_from=str(tmp_path / "ours"), cross_view_levels=False)
    assert per_view.config.cross_view_levels is False


def test_paper_unet_layout_from_the_published_sd21_config_on_meta():
    """SD-2.1's published unet/config.json (written by diffusers 0.10) gives the `sd21` layout,
    CAMEO's layer 10 at 1/16, and every field it sets is one this backbone reproduces."""
    from pathlib import Path

    from backbones.init_sd_unet import check_reproducible, sd_unet_architecture

    sd21 = {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.10.0.dev0", "act_fn": "silu",
        "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False, "cross_attention_dim": 1024,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
        "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
        "norm_num_groups": 32, "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4,
        "sample_size": 96, "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "upcast_attention": True, "use_linear_projection": True,
    }
    arch = sd_unet_architecture(sd21)
    with torch.device("meta"):
        model = create_backbone("mv_unet", **arch)
        preset = create_backbone("mv_unet", "sd21")
    check_reproducible(sd21, dict(model.unet.config), Path("config.json"))  # raises on any unsupported field
    assert model.layer_names() == preset.layer_names()
    assert [layer.cross_view for layer in model.attention_layers()] == [
        layer.cross_view for layer in preset.attention_layers()]
    assert model.resolve_layer("decoder:1/16", input_stride=8) == "up.02.attn.00"
    assert arch["upcast_attention"] is True and arch["qk_norm"] is False
    # the published SD-2.1 UNet (865,910,724 parameters) minus its text cross-attention, plus the camera encoder
    text_attention = sum(n * (2 * c * c + 2 * 1024 * c + 3 * c) for c, n in ((320, 5), (640, 5), (1280, 6)))
    camera = sum(p.numel() for n, p in model.named_parameters() if n.startswith("camera_encoder."))
    assert sum(p.numel() for p in model.parameters()) - camera == 865_910_724 - text_attention
