"""A checkpoint of the wrong kind for `init_from` fails in one line naming the file, what it looks
like and its first missing/unexpected keys; so do damaged or unsupported checkpoints.

Fixtures are written in each format's own layout (diffusers save_pretrained folders, a DiT state
dict); nothing is downloaded.
"""
from __future__ import annotations

import re

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

from backbones import create_backbone
from backbones.checkpoints import CheckpointMismatchError
from test_pretrained_dit import dit_state_dict
from test_pretrained_unet import stock_unet


@pytest.fixture
def dit_file(tmp_path):
    path = tmp_path / "DiT-micro.pt"
    torch.save(dit_state_dict(), path)
    return path


@pytest.fixture
def sd_folder(tmp_path):
    stock_unet().save_pretrained(tmp_path / "sd")
    return tmp_path / "sd"


def vae_folder(root):
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4).save_pretrained(root)
    return root


def fails(match: str, name: str, path, **overrides) -> str:
    with pytest.raises(CheckpointMismatchError, match=match) as err:
        create_backbone(name, init_from=str(path), **overrides)
    return str(err.value)


def test_a_dit_file_given_to_the_unet(dit_file):
    message = fails("looks like a DiT checkpoint", "mv_unet", dit_file)
    assert str(dit_file) in message and "backbone 'mv_dit' initialises from it" in message
    assert "missing keys: ['conv_in.weight', 'time_embedding.linear_1.weight'" in message
    assert "unexpected keys: ['x_embedder.proj.weight'" in message


def test_a_vae_folder_given_as_a_unet(tmp_path):
    folder = vae_folder(tmp_path / "vae")
    message = fails("looks like a diffusers AutoencoderKL", "mv_unet", folder)
    assert str(folder / "diffusion_pytorch_model.safetensors") in message
    assert "missing keys: ['conv_in.weight'" in message
    assert re.search(r"unexpected keys: \['(encoder|decoder)\.", message)
    fails("looks like a diffusers AutoencoderKL", "mv_dit", folder)


def test_an_sd_unet_given_to_the_dit(sd_folder):
    message = fails("looks like a diffusers UNet2DConditionModel", "mv_dit", sd_folder)
    assert "backbone 'mv_unet' initialises from it" in message and "x_embedder.proj.weight" in message


def test_one_backbones_save_pretrained_folder_given_to_the_other(tmp_path):
    create_backbone("mv_unet", "micro").save_pretrained(tmp_path / "unet")
    create_backbone("mv_dit", "micro").save_pretrained(tmp_path / "dit")
    fails("looks like a mv_unet save_pretrained folder", "mv_dit", tmp_path / "unet")
    fails("looks like a mv_dit save_pretrained folder", "mv_unet", tmp_path / "dit")


def test_a_damaged_sd_folder_names_the_missing_and_unexpected_keys(sd_folder):
    weights = sd_folder / "diffusion_pytorch_model.safetensors"
    sd = load_file(weights)
    key = "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.weight"
    sd["extra.weight"] = sd.pop(key)
    save_file(sd, weights)
    message = fails(r"keys do not match the model built from it", "mv_unet", sd_folder)
    assert str(weights) in message and f"missing keys ['{key}']" in message and "['extra.weight']" in message


def test_a_damaged_dit_file_names_the_missing_key(tmp_path):
    sd = dit_state_dict()
    del sd["blocks.1.mlp.fc2.bias"]
    torch.save(sd, tmp_path / "d.pt")
    fails(r"d\.pt: keys do not match.*missing keys \['blocks\.1\.mlp\.fc2\.bias'\]", "mv_dit", tmp_path / "d.pt")


def test_an_sd_unet_this_backbone_cannot_reproduce_is_refused(tmp_path):
    stock_unet(resnet_time_scale_shift="scale_shift").save_pretrained(tmp_path)
    fails(r"config\.json: resnet_time_scale_shift = 'scale_shift' is not supported by mv_unet", "mv_unet", tmp_path)


def test_overrides_and_presets_that_contradict_the_source(sd_folder):
    fails(r"override in_channels=3 conflicts with the source \(in_channels=4\)", "mv_unet", sd_folder, in_channels=3)
    fails(r"override input_patch=2 conflicts", "mv_unet", sd_folder, input_patch=2)
    with pytest.raises(CheckpointMismatchError, match=r"cross_view_levels needs one entry per level \(3\).*"
                                                      r"preset 'micro' contributed \['camera_hidden', 'cross_view_levels'\]"):
        create_backbone("mv_unet", "micro", init_from=str(sd_folder))  # micro has 2 levels


def test_paths_that_hold_no_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        create_backbone("mv_dit", init_from=str(tmp_path / "nowhere.pt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: no config\.json here or in .*empty/unet"):
        create_backbone("mv_unet", init_from=str(tmp_path / "empty"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointMismatchError, match=r"notes\.txt: unknown checkpoint file type"):
        create_backbone("mv_dit", init_from=str(tmp_path / "notes.txt"))
