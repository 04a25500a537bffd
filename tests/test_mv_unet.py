"""mv_unet-specific checks, against references that do not go through the model's own code path:
forward pre-hooks for execution order, the SD-2.1 layout as published, a stock diffusers UNet for
weight loading, and attention recomputed by hand from the layer's own projections."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from backbones import TapRequest, UnknownLayerError, create_backbone
from backbones.mv_unet import MultiViewUNet


def _inputs(B=2, V=3, C=3, H=16, seed=0):
    """Random scene: cameras on a circle looking roughly inward, view 0 the reference."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, V, C, H, H, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    f = 1.2 * H
    K = torch.tensor([[f, 0, (H - 1) / 2], [0, f, (H - 1) / 2], [0, 0, 1.0]]).expand(B, V, 3, 3)
    c2w = torch.eye(4).repeat(B, V, 1, 1)
    angles = torch.rand(B, V, generator=g) * 0.8
    c, s = torch.cos(angles), torch.sin(angles)
    c2w[..., 0, 0], c2w[..., 0, 2], c2w[..., 2, 0], c2w[..., 2, 2] = c, s, -s, c  # rotation about y
    c2w[..., :3, 3] = torch.randn(B, V, 3, generator=g)
    mask = torch.ones(B, V)
    mask[:, 0] = 0
    return x, t, dict(cam2world=c2w, intrinsics=K, cond_mask=mask)


def _micro(**overrides):
    torch.manual_seed(0)
    return create_backbone("mv_unet", "micro", **overrides).eval()


# ---- layer names and order ---------------------------------------------------------------------
def test_layer_names_follow_execution_order():
    # 5 layers per block: 23 attention layers, so any sort of module paths (…attentions.10 < …2)
    # or of unpadded names would disagree with the order they actually run in.
    model = _micro(layers_per_block=5)
    layers = model.attention_layers()
    names = [layer.name for layer in layers]
    seen: list[str] = []
    handles = [
        model.attention_module(name).register_forward_pre_hook(lambda m, a, n=name: seen.append(n))
        for name in names
    ]
    x, t, cams = _inputs(B=1, V=2, H=8)
    with torch.no_grad():
        model(x, t, **cams)
    for h in handles:
        h.remove()
    assert seen == names
    assert [layer.index for layer in layers] == list(range(len(layers)))
    assert all(re.fullmatch(r"(down|up)\.\d\d\.attn\.\d\d|mid\.attn\.\d\d", n) for n in names)
    # SD block structure: layers_per_block attentions per down block, one more per up block
    assert sum(n.startswith("down.") for n in names) == 2 * 5
    assert sum(n.startswith("up.") for n in names) == 2 * 6
    assert names[10] == "mid.attn.00" and names[11] == "up.00.attn.00" and names[-1] == "up.01.attn.05"
    # stages are the blocks: down = encoder, mid, up = decoder
    assert [layer.stage for layer in layers] == ["encoder"] * 10 + ["mid"] + ["decoder"] * 12


def test_sd21_layout_on_meta_device():
    with torch.device("meta"):
        model = create_backbone("mv_unet", "sd21")
    layers = model.attention_layers()
    assert len(layers) == 16
    assert [layer.num_heads for layer in layers] == [5, 5, 10, 10, 20, 20, 20, 20, 20, 20, 10, 10, 10, 5, 5, 5]
    assert {layer.head_dim for layer in layers} == {64}
    # per-view only at the top (64x64) level: down_blocks.0 (2) and up_blocks.3 (3)
    assert [layer.cross_view for layer in layers] == [False] * 2 + [True] * 11 + [False] * 3
    assert [layer.stride for layer in layers] == [1, 1, 2, 2, 4, 4, 8, 4, 4, 4, 2, 2, 2, 1, 1, 1]
    cameo = layers[10]  # CAMEO's layer 10: first decoder attention at 32x32 (for 512 px images)
    assert cameo.name == "up.02.attn.00" and cameo.cross_view and cameo.num_heads == 10
    assert tuple(model.attention_module(cameo.name).to_q.weight.shape) == (640, 640)
    assert model.unet.conv_in.in_channels == 4 and model.unet.conv_out.out_channels == 4
    assert not any(".attn2" in n for n, _ in model.named_modules())
    assert all(block.norm2 is None for n, block in model.named_modules() if n.endswith("transformer_blocks.0"))
    # parameter count: the published SD-2.1 UNet minus its text cross-attention (1024-d context),
    # plus our own additions (camera encoder, per-head q/k LayerNorms)
    sd21_unet = 865_910_724
    text_attention = sum(n * (2 * c * c + 2 * 1024 * c + 3 * c) for c, n in ((320, 5), (640, 5), (1280, 6)))
    ours = sum(p.numel() for n, p in model.named_parameters() if "camera_encoder" not in n and "norm_q" not in n
               and "norm_k" not in n)
    assert ours == sd21_unet - text_attention


def _meta(preset: str):
    with torch.device("meta"):
        return create_backbone("mv_unet", preset)


def test_sd21_paper_layer_by_resolution_and_first_cross_view_decoder_layer():
    """CAMEO's layer 10 is the first decoder attention at 1/16 of the image (32x32 tokens for
    512 px images, i.e. 64x64 SD latents: input_stride 8)."""
    model = _meta("sd21")
    assert model.resolve_layer("decoder:1/16", input_stride=8) == "up.02.attn.00"
    assert model.get_attention_layer("up.02.attn.00").index == 10
    assert model.resolve_layer("decoder:first_cross_view") == "up.01.attn.00"  # 16x16, after the mid block
    assert model.resolve_layer("decoder:last_cross_view") == "up.02.attn.02"
    assert model.resolve_layer("encoder:first_cross_view") == "down.01.attn.00"
    assert model.resolve_layer("first_cross_view") == "down.01.attn.00"
    assert model.resolve_layer("1/16", input_stride=8) == "down.01.attn.00"  # the encoder comes first
    assert model.resolve_layer("decoder:1/8", input_stride=8) == "up.03.attn.00"
    assert model.resolve_layer("mid:first") == model.resolve_layer("1/64", input_stride=8) == "mid.attn.00"
    assert model.resolve_layer("decoder:first") == "up.01.attn.00"  # up_blocks.0 has no attention in SD
    with pytest.raises(UnknownLayerError, match=r"input_stride=1; its grids are at 1/1, 1/2, 1/4"):
        model.resolve_layer("decoder:1/16")  # in pixel units the decoder has no 1/16 grid


@pytest.mark.parametrize("preset, selector, expected", [
    ("micro", "decoder:first_cross_view", "up.00.attn.00"),
    ("micro", "decoder:last_cross_view", "up.00.attn.01"),
    ("micro", "decoder:1/1", "up.01.attn.00"),
    ("micro", "encoder:1/1", "down.00.attn.00"),
    ("micro", "first_cross_view", "down.01.attn.00"),
    ("micro", "last", "up.01.attn.01"),
    ("micro", "depth:0.5", "up.00.attn.00"),  # 7 layers: index round(0.5 * 6) = 3
    ("micro", "decoder:depth:0.5", "up.01.attn.00"),  # 4 decoder layers: round(1.5) = 2
    ("tiny", "decoder:first_cross_view", "up.00.attn.00"),
    ("tiny", "decoder:1/2", "up.01.attn.00"),  # the quickstart's UNet layer: highest 3D decoder resolution
    ("tiny", "encoder:first", "down.01.attn.00"),  # no attention at the top level
])
def test_selectors_on_small_unets(preset, selector, expected):
    assert _meta(preset).resolve_layer(selector) == expected


# ---- attention correctness ---------------------------------------------------------------------
def _capture_input(module):
    store = {}
    handle = module.register_forward_pre_hook(lambda m, args: store.setdefault("x", args[0].detach()))
    return store, handle


def _naive_qkv(attn, hidden, V):  # hidden [(B V), n, C] -> q, k, v [B, H, V*n, d], by hand
    BV, n, C = hidden.shape
    H = attn.heads

    def split(x):
        return x.reshape(BV // V, V, n, H, C // H).permute(0, 3, 1, 2, 4).reshape(BV // V, H, V * n, C // H)

    q, k, v = split(attn.to_q(hidden)), split(attn.to_k(hidden)), split(attn.to_v(hidden))
    return attn.norm_q(q), attn.norm_k(k), v


@pytest.mark.parametrize("layer_name", ["down.01.attn.00", "up.01.attn.00"])  # cross-view, per-view
def test_tap_matches_naive_attention(layer_name):
    model = _micro()
    x, t, cams = _inputs()
    B, V = x.shape[:2]
    attn = model.attention_module(layer_name)
    store, handle = _capture_input(attn)
    query_idx = torch.stack([torch.randperm(V * 64)[:40] if layer_name.startswith("down") else
                             torch.randperm(V * 256)[:40] for _ in range(B)])
    with torch.no_grad():
        out = model(x, t, **cams, tap=TapRequest(layer_name, query_idx))
    handle.remove()
    tap = out.tap
    q, k, v = _naive_qkv(attn, store["x"], V)
    N, d = q.shape[2], q.shape[3]
    assert tap.grid == (V, int(math.isqrt(N // V)), int(math.isqrt(N // V)))
    logits = q @ k.transpose(-1, -2) / math.sqrt(d)  # [B, H, N, N]
    cross_view = model.get_attention_layer(layer_name).cross_view
    if not cross_view:  # keys of the query's own view only
        view = torch.arange(N) // (N // V)
        logits = logits.masked_fill(view[:, None] != view[None, :], float("-inf"))
    probs = logits.softmax(-1)
    rows = torch.gather(probs, 2, query_idx[:, None, :, None].expand(-1, probs.shape[1], -1, N))

    tap_logits = tap.logits()  # [B, H, Qs, N]
    if not cross_view:
        qview = query_idx // (N // V)  # [B, Qs]
        own = (torch.arange(N) // (N // V))[None, :] == qview[..., None]  # [B, Qs, N]
        tap_logits = tap_logits.masked_fill(~own[:, None], float("-inf"))
    torch.testing.assert_close(tap_logits.softmax(-1), rows, atol=1e-6, rtol=1e-5)
    assert torch.equal(tap.query_idx, query_idx)

    # and the layer's output is softmax @ V through to_out: the tap saw what SDPA used
    seen = {}
    handle = attn.register_forward_hook(lambda m, a, o: seen.setdefault("y", o))
    with torch.no_grad():
        model(x, t, **cams)
        expected = attn.to_out[0]((probs @ v).reshape(B, -1, V, N // V, d).permute(0, 2, 3, 1, 4)
                                  .reshape(B * V, N // V, -1))
    handle.remove()
    torch.testing.assert_close(seen["y"], expected, atol=1e-5, rtol=1e-5)


def test_output_identical_with_and_without_tap():
    model = _micro()
    x, t, cams = _inputs()
    with torch.no_grad():
        plain = model(x, t, **cams)
        tapped = model(x, t, **cams, tap=TapRequest("up.00.attn.00"))
    assert plain.tap is None and tapped.tap is not None
    assert torch.equal(plain.sample, tapped.sample)


def test_identity_perturbation_outputs_values():
    model = _micro()
    x, t, cams = _inputs()
    name = "mid.attn.00"
    attn = model.attention_module(name)
    store, handle = _capture_input(attn)
    seen = {}
    handle2 = attn.register_forward_hook(lambda m, a, o: seen.setdefault("y", o))
    with torch.no_grad():
        model(x, t, **cams, perturb={name: "identity"})
        expected = attn.to_out[0](attn.to_v(store["x"]))
    handle.remove(), handle2.remove()
    torch.testing.assert_close(seen["y"], expected)


# ---- per-level cross-view configuration --------------------------------------------------------
@pytest.mark.parametrize("cross_view_levels, mixes", [((False, False), False), ((False, True), True)])
def test_cross_view_levels_control_view_mixing(cross_view_levels, mixes):
    model = _micro(cross_view_levels=cross_view_levels)
    x, t, cams = _inputs()
    x2 = x.clone()
    x2[:, 1] += torch.randn_like(x2[:, 1])
    with torch.no_grad():
        a, b = model(x, t, **cams).sample, model(x2, t, **cams).sample
    others = [0, 2]
    assert (a[:, 1] - b[:, 1]).abs().max() > 1e-3
    change = (a[:, others] - b[:, others]).abs().max()
    assert (change > 1e-4) if mixes else (change < 1e-6)


# ---- gradient checkpointing --------------------------------------------------------------------
def test_tap_carries_grad_under_checkpointing_and_matches_plain_gradients():
    x, t, cams = _inputs(B=1)
    grads = []
    for checkpointing in (False, True):
        model = _micro().train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        # the perturbation upstream of the tap must be replayed identically when checkpointing
        # recomputes the blocks during backward
        out = model(x, t, **cams, tap=TapRequest("up.00.attn.00"), perturb={"down.01.attn.00": "identity"})
        assert out.tap.q.requires_grad and out.tap.k.requires_grad
        loss = out.tap.logits().logsumexp(-1).mean() + out.sample.square().mean()
        loss.backward()
        assert model.attention_module("up.00.attn.00").to_q.weight.grad is not None
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


# ---- camera injection --------------------------------------------------------------------------
def test_camera_injection_modes():
    x, t, cams = _inputs()
    moved = dict(cams, cam2world=cams["cam2world"].clone())
    moved["cam2world"][:, 1:, :3, 3] += 0.5  # other relative poses
    for mode, in_ch in (("add", 3), ("concat", 10)):
        model = _micro(camera_injection=mode)
        assert model.unet.conv_in.in_channels == in_ch
        assert (model.camera_encoder is None) == (mode == "concat")
        with torch.no_grad():
            a, b = model(x, t, **cams).sample, model(x, t, **moved).sample
        assert a.shape == x.shape
        if mode == "add":  # zero-initialised encoder: cameras have no effect until trained
            assert torch.equal(a, b)
        else:
            assert (a - b).abs().max() > 1e-4
    with pytest.raises(ValueError, match="camera_injection"):
        _micro(camera_injection="film")


# ---- Stable Diffusion initialisation -----------------------------------------------------------
def _stock_micro_unet():
    """A randomly initialised diffusers UNet in the micro layout, as an SD checkpoint would be."""
    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(1, 2), norm_num_groups=8, cross_attention_dim=12, use_linear_projection=True,
    )
    with torch.no_grad():  # silence text cross-attention so the stock UNet is a pure self-attention UNet
        for name, module in unet.named_modules():
            if name.endswith("attn2"):
                module.to_out[0].weight.zero_()
                module.to_out[0].bias.zero_()
    return unet.eval()


@pytest.mark.parametrize("layout", ["unet_folder", "pipeline_folder"])
def test_from_sd_checkpoint_copies_weights(tmp_path, layout):
    stock = _stock_micro_unet()
    if layout == "pipeline_folder":
        stock.save_pretrained(tmp_path / "unet")
        (tmp_path / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DConditionModel"]}))
    else:
        stock.save_pretrained(tmp_path)
    model = MultiViewUNet.from_sd_checkpoint(tmp_path, preset="micro")
    ref = stock.state_dict()
    own = model.unet.state_dict()
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert torch.equal(own[name], ref[name])
    assert torch.equal(own["conv_in.weight"], ref["conv_in.weight"])
    copied = [k for k in own if "norm_q" not in k and "norm_k" not in k]
    assert all(torch.equal(own[k], ref[k]) for k in copied)

    # concat mode: pretrained kernel in the first channels, zeros for the 7 camera channels
    concat = MultiViewUNet.from_sd_checkpoint(tmp_path, preset="micro", camera_injection="concat")
    w = concat.unet.conv_in.weight
    assert w.shape[1] == 10 and torch.equal(w[:, :3], ref["conv_in.weight"]) and not w[:, 3:].any()


def test_from_sd_checkpoint_per_view_reproduces_stock_unet(tmp_path):
    # with every level per-view and no q/k norm, "inflation" changes nothing: each view must come
    # out exactly as the stock UNet computes it alone (its silenced attn2 contributes zero)
    stock = _stock_micro_unet()
    stock.save_pretrained(tmp_path)
    model = MultiViewUNet.from_sd_checkpoint(
        tmp_path, preset="micro", cross_view_levels=(False, False), qk_norm=False
    ).eval()
    x, t, cams = _inputs(B=1, V=2)
    with torch.no_grad():
        ours = model(x, t, **cams).sample[0]  # [V, C, H, W]
        text = torch.zeros(2, 1, 12)
        theirs = stock(x[0], t.expand(2), encoder_hidden_states=text).sample
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_from_sd_checkpoint_rejects_presets_that_do_not_fit_and_missing_folders(tmp_path):
    # the architecture comes from config.json; a preset only brings its multi-view fields, and
    # tiny's three per-level entries do not fit a two-level UNet
    _stock_micro_unet().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"needs one entry per level \(2\).*preset 'tiny' contributed"):
        MultiViewUNet.from_sd_checkpoint(tmp_path, preset="tiny")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        MultiViewUNet.from_sd_checkpoint(tmp_path / "empty", preset="micro")


# ---- errors and round trip ---------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    model = _micro()
    x, t, cams = _inputs()
    with pytest.raises(UnknownLayerError, match="mid.attn.00"):
        model(x, t, **cams, tap=TapRequest("mid.attn.0"))
    with pytest.raises(ValueError, match="intrinsics must have shape"):
        model(x, t, **dict(cams, intrinsics=cams["intrinsics"][:, :2]))
    with pytest.raises(ValueError, match="divisible by 2"):
        model(x[..., :15, :15], t, **cams)
    with pytest.raises(ValueError, match="norm_num_groups=32 does not divide"):
        _micro(norm_num_groups=32)


def test_save_load_round_trip(tmp_path):
    model = _micro(camera_injection="concat")
    model.save_pretrained(tmp_path)
    loaded = MultiViewUNet.from_pretrained(tmp_path).eval()
    assert loaded.layer_names() == model.layer_names()
    x, t, cams = _inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, **cams).sample, loaded(x, t, **cams).sample)


# ---- input_patch: the UNet on a pixel-unshuffled grid ------------------------------------------
def test_input_patch_is_the_unet_on_the_unshuffled_grid():
    """With the cameras inert (zero-initialised encoder), input_patch=2 is a 4x-channel UNet applied
    to torch's pixel_unshuffle of each view, its output pixel-shuffled back."""
    patched = _micro(input_patch=2)
    plain = _micro(in_channels=12)  # the same inner UNet shapes: conv_in 12 -> 16, conv_out 16 -> 12
    plain.unet.load_state_dict(patched.unet.state_dict())
    x, t, cams = _inputs(B=1, V=2, H=16)
    with torch.no_grad():
        ours = patched(x, t, **cams).sample
        small = F.pixel_unshuffle(x.flatten(0, 1), 2).unflatten(0, (1, 2))  # [1, 2, 12, 8, 8]
        half = dict(cams, intrinsics=cams["intrinsics"].clone())  # any K: cameras are inert in both
        ref = F.pixel_shuffle(plain(small, t, **half).sample.flatten(0, 1), 2).unflatten(0, (1, 2))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("injection", ["add", "concat"])
def test_input_patch_strides_grids_and_cameras_at_the_input_resolution(injection):
    from backbones.camera import camera_conditioning
    from test_backbone_contract import wake

    plain, model = _micro(camera_injection=injection), wake(_micro(input_patch=2, camera_injection=injection))
    assert [layer.stride for layer in model.attention_layers()] == [2 * layer.stride for layer in plain.attention_layers()]
    x, t, cams = _inputs(B=1, V=2, H=16)
    seen = {}

    def record(module, args, output=None):  # first call only; returns None so nothing is replaced
        seen.setdefault("in", args[0])
        seen.setdefault("out", output)

    if injection == "add":  # the encoder reads the raymap of the 16x16 input and writes the 8x8 grid
        model.camera_encoder.register_forward_hook(record)
    else:
        model.unet.conv_in.register_forward_pre_hook(record)
    other_poses = cams["cam2world"].clone()
    other_poses[:, 1:, :3, 3] += 0.5
    with torch.no_grad():
        out = model(x, t, **cams, tap=TapRequest("up.01.attn.00"))
        moved = model(x, t, **dict(cams, cam2world=other_poses)).sample
    assert out.sample.shape == x.shape and out.tap.grid == (2, 8, 8)
    rays = camera_conditioning(cams["intrinsics"], cams["cam2world"], cams["cond_mask"], 16, 16).flatten(0, 1)
    if injection == "add":
        assert torch.equal(seen["in"], rays) and seen["out"].shape == (2, 16, 8, 8)
    else:  # cameras concatenated at 16x16, then unshuffled with x_t: channels (3 + 7) * 4
        assert seen["in"].shape == (2, 40, 8, 8)
        torch.testing.assert_close(seen["in"], F.pixel_unshuffle(torch.cat([x.flatten(0, 1), rays], 1), 2))
    assert (moved - out.sample).abs().max() > 1e-4  # cameras matter once the path is trained
    with pytest.raises(ValueError, match=r"x_t size 14x14 must be divisible by 4 \(input_patch 2"):
        model(x[..., :14, :14], t, **cams)
