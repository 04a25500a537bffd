"""An experiment at micro shapes (`run_experiment.shrink = True`): what CI runs of a paper recipe, so the recipe cannot rot.

A paper recipe (gin/experiments/cat3d_sd21.gin, mvdit_xl2.gin) needs local weights, a VAE and a
converted dataset, and a GPU; none of that exists in CI. Shrinking keeps every choice that is not a
size (schedule, prediction type, loss variants, layer selector, precision, checkpointing, optimiser,
guidance) and replaces only what is: the backbone's preset by `micro`, pretrained weights by a random
initialisation, the VAE folder by a random micro VAE (3 downsamplings, so latents stay 8x smaller than
the images, as with SD's VAE), the dataset by a few synthetic scenes, and the run by a few steps with
one small evaluation. The layer is kept as written, so a recipe should name it with a selector
(`decoder:1/16`) that means the same part of the network on every preset.
"""
from __future__ import annotations

import dataclasses

from cameo_bench.config.spec import DataSpec, Experiment

STEPS = 3
# 8x8 latents under the micro VAE (downsample 8): the micro UNet's two levels and the micro DiT's
# patch 2 both fit; in pixel space the micro presets' own 16 px.
IMAGE_SIZE = {"vae": 64, "pixel": 16}


def shrunk(exp: Experiment) -> Experiment:
    """`exp` at micro shapes with random weights; `shrink=True` marks it (and lets the build use a
    random micro VAE where `codec.vae_path` is empty).

    Backbone overrides are kept only when they are flags (`qk_norm=False` is a choice of the
    recipe; `block_out_channels=...` is a size that would not fit the micro preset).
    """
    flags = {k: v for k, v in exp.backbone.overrides.items() if isinstance(v, bool)}
    backbone = dataclasses.replace(exp.backbone, preset="micro", init_from="", overrides=flags)
    codec = dataclasses.replace(exp.codec, vae_path="", cache_dir="")
    # a fresh synthetic section: the views and references of the recipe, nothing folder-specific
    data = DataSpec(kind="synthetic", num_scenes=4, num_eval_scenes=2, num_views=exp.data.num_views,
                    num_ref=exp.data.num_ref, image_size=IMAGE_SIZE[exp.codec.kind], seed=exp.data.seed, batch_size=2)
    train = dataclasses.replace(exp.train, steps=STEPS, log_every=1, checkpoint_every=STEPS)
    evaluation = dataclasses.replace(exp.eval, every=STEPS, at_start=False, num_scenes=2, batch_size=2,
                                     sampler_steps=2, lpips=False, index=None, index_root=None)
    return dataclasses.replace(exp, backbone=backbone, codec=codec, data=data, train=train, eval=evaluation,
                               shrink=True)
