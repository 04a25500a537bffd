"""mv_unet `camera_levels`: the raymap also enters every attention site, through zero-initialised
embeddings, so the default is unchanged, the option is a no-op at init (an SD-initialised model is
still the stock UNet per view), and training reaches the new parameters."""
from __future__ import annotations

import copy

import pytest
import torch

from backbones import create_backbone
from test_mv_unet import _inputs
from test_pretrained_unet import compare, inputs, stock_unet, write

LEVELS = ["attention", "attention_sincos"]


def _tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return create_backbone("mv_unet", "tiny", input_patch=2, **overrides).eval()


def _out(model, seed=0):
    x, t, cams = _inputs(B=2, V=3, H=32, seed=seed)
    with torch.no_grad():
        return model(x, t, **cams).sample


def test_default_is_input_only_and_unchanged():
    plain, explicit = _tiny(), _tiny(camera_levels="input")
    assert plain.config.camera_levels == "input" and plain.level_cameras is None
    # same parameters (no new ones, same random init) and the same output
    assert plain.state_dict().keys() == explicit.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), explicit.state_dict().values()))
    assert torch.equal(_out(plain), _out(explicit))


@pytest.mark.parametrize("levels", LEVELS)
def test_option_is_a_no_op_at_init(levels):
    plain, levelled = _tiny(), _tiny(camera_levels=levels)
    # the UNet and camera encoder are built first, so they draw the same random numbers
    own = levelled.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in plain.state_dict().items())
    extra = [k for k in own if k.startswith("level_cameras.")]
    assert len(extra) == 7 * 4  # 7 attention sites (down 1, 2, mid, up 0 x2, up 1 x2), 2 convs each
    assert torch.equal(_out(plain), _out(levelled))
    assert torch.equal(_out(copy.deepcopy(levelled)), _out(levelled))  # the hooks survive deepcopy (EMA)


@pytest.mark.parametrize("levels", LEVELS)
def test_new_parameters_train(levels):
    model = _tiny(camera_levels=levels).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, t, cams = _inputs(B=2, V=3, H=32)
    for step in range(2):
        opt.zero_grad()
        loss = model(x, t, **cams).sample.square().mean()
        loss.backward()
        grads = {n: p.grad for n, p in model.level_cameras.named_parameters()}
        # the zero last layer gets gradient from the start; the layers before it once it is nonzero
        outs = [g for n, g in grads.items() if ".out." in n]
        assert all(g is not None and g.abs().sum() > 0 for g in outs), step
        if step == 1:
            assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
        opt.step()
    # once trained, the embeddings depend on the cameras: moving them changes the output
    moved = dict(cams, cam2world=cams["cam2world"] + 0.3, cond_mask=1 - cams["cond_mask"])
    with torch.no_grad():
        assert not torch.allclose(model(x, t, **cams).sample, model(x, t, **moved).sample)


@pytest.mark.parametrize("levels", LEVELS)
def test_one_view_sd_equivalence_with_the_option(tmp_path, levels):
    stock = stock_unet()
    model = create_backbone("mv_unet", init_from=write(stock, tmp_path, "unet_folder"), camera_levels=levels).eval()
    assert model.config.camera_levels == levels and model.level_cameras is not None
    compare(model, stock)
    x, t, cams = inputs()
    moved = dict(cams, cam2world=cams["cam2world"] + 0.3, cond_mask=1 - cams["cond_mask"])
    with torch.no_grad():
        assert torch.equal(model(x, t, **cams).sample, model(x, t, **moved).sample)


def test_rejects_unknown_value():
    with pytest.raises(ValueError, match="camera_levels"):
        create_backbone("mv_unet", "micro", camera_levels="everywhere")
