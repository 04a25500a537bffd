"""The latent cache: entries equal encoding the dataset's own images, training items read no image,
stale and corrupt entries are named and rebuilt, `cameo-bench data encode` fills it, and a micro run
on 8x latents from a micro AutoencoderKL folder trains, evaluates and draws its figures.

The VAE is a micro `AutoencoderKL` written by the test in diffusers' own folder layout (4 blocks,
3 downsamplings), the scenes a scene-folder dataset written by `cameo-bench data synth`'s writer.
"""
from __future__ import annotations

import math
import os
import pathlib
import warnings

import pytest
import torch
from diffusers import AutoencoderKL

from cameo_bench.cli.data import write_synthetic
from cameo_bench.config.spec import BackboneSpec, CameoSpec, CodecSpec, DataSpec, EvalSpec, Experiment, TrainSpec
from cameo_bench.data import scene_dataset
from cameo_bench.data.latents import LatentCache, encode_dataset, with_latent_cache
from cameo_bench.data.scene_dataset import SceneFolderDataset
from cameo_bench.objectives.codecs import MICRO_VAE_CONFIG, VaeCodec

SIZE = (48, 64)  # from 80x80 frames: a centre crop to 60x80, then a resize, exercised by every entry


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent_cache")
    write_synthetic(root / "scenes", num_scenes=3, num_views=4, image_size=80, azimuth_step_deg=30.0, seed=0,
                    test_scenes=1)
    torch.manual_seed(1)
    AutoencoderKL(**MICRO_VAE_CONFIG).save_pretrained(root / "vae")
    return root


def dataset(root: pathlib.Path, split: str = "train") -> SceneFolderDataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the centre crop's "cuts off" warning
        return SceneFolderDataset(root / "scenes", num_views=3, split=split, image_size=SIZE)


def test_cached_latents_equal_encoding_the_dataset_images(folders, tmp_path):
    codec = VaeCodec.from_folder(folders / "vae")
    plain = dataset(folders)
    cache = LatentCache.for_codec(tmp_path, codec, plain)
    cached = with_latent_cache(plain, cache)
    item, reference = cached[0], plain[0]
    assert "image" not in item and "image" in reference
    assert item["latent"].shape == (3, 4, 6, 8)
    expected = codec.encode(reference["image"][None])[0]  # the dataset's own image, encoded now
    torch.testing.assert_close(item["latent"], expected, rtol=1e-5, atol=1e-5)
    for key in ("intrinsics", "cam2world", "depth"):
        assert torch.equal(item[key], reference[key])
    scene, frames = plain.sample_frames(0)
    entries = sorted((cache.folder / scene).glob("*.safetensors"))
    assert len(entries) == 3 and cache.folder.name == f"{codec.identity()[:16]}_48x64_center_crop"


def test_training_items_read_no_image_once_cached(folders, tmp_path, monkeypatch):
    codec = VaeCodec.from_folder(folders / "vae")
    plain = dataset(folders)
    cached = with_latent_cache(plain, LatentCache.for_codec(tmp_path, codec, plain))
    first = [cached[i]["latent"] for i in range(len(cached))]  # fills the cache

    def no_image(*args, **kwargs):
        raise AssertionError("an image was read")

    monkeypatch.setattr(scene_dataset, "read_image", no_image)
    monkeypatch.setattr("cameo_bench.data.latents.read_image", no_image)
    for i, latent in enumerate(first):
        assert torch.equal(cached[i]["latent"], latent)


def test_stale_and_corrupt_entries_are_named_and_rebuilt(folders, tmp_path):
    codec = VaeCodec.from_folder(folders / "vae")
    plain = dataset(folders)
    cache = LatentCache.for_codec(tmp_path, codec, plain)
    cams = plain.cameras[0]
    good, _, n = cache.frames(cams, [0, 1, 2])
    assert n == 3
    assert cache.frames(cams, [0, 1, 2])[2] == 0  # all valid now: nothing encoded

    cache.path(cams, 0).write_bytes(b"not a safetensors file")
    image = cams.image_paths[1]
    st = os.stat(image)
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the frame changed since it was cached
    with pytest.warns(UserWarning) as record:
        again, _, n = cache.frames(cams, [0, 1, 2])
    messages = [str(w.message) for w in record]
    assert n == 2
    assert any(str(cache.path(cams, 0)) in m and "corrupt" in m for m in messages)
    assert any(str(cache.path(cams, 1)) in m and "stale (source_mtime_ns" in m for m in messages)
    torch.testing.assert_close(again, good)

    # another VAE is another key folder; an entry copied across keys is refused, not used
    torch.manual_seed(2)
    other = VaeCodec(AutoencoderKL(**MICRO_VAE_CONFIG))
    other_cache = LatentCache.for_codec(tmp_path, other, plain)
    assert other_cache.folder != cache.folder
    other_cache.path(cams, 2).parent.mkdir(parents=True)
    other_cache.path(cams, 2).write_bytes(cache.path(cams, 2).read_bytes())
    with pytest.warns(UserWarning, match=r"stale \(vae is"):
        mean, _, n = other_cache.frames(cams, [2])
    assert n == 1 and not torch.allclose(mean[0], good[2])


def test_data_encode_fills_the_cache_and_reports_the_rate(folders, tmp_path, capsys):
    from cameo_bench.__main__ import main

    out = tmp_path / "cache"
    args = ["data", "encode", "--vae", str(folders / "vae"), str(folders / "scenes"), str(out), "--image-size", "48x64",
            "--device", "cpu"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "12 frames, 12 encoded, 0 already cached" in printed and "frames/s on cpu" in printed
    assert main(args) == 0
    assert "12 frames, 0 encoded, 12 already cached" in capsys.readouterr().out
    codec = VaeCodec.from_folder(folders / "vae")
    assert len(list(LatentCache(out, codec, SIZE, "center_crop").folder.rglob("*.safetensors"))) == 12


class FileTracker:
    """Keeps the files a run logs (what MLflow's artifacts would hold)."""

    def __init__(self):
        self.files = []

    def log_params(self, params):
        pass

    def log_metrics(self, metrics, step):
        pass

    def log_artifact(self, path, folder=None):
        self.files.append(pathlib.Path(path))

    def flush(self):
        pass

    def finish(self, status, error):
        pass


@pytest.mark.slow
def test_micro_run_on_8x_latents_trains_evaluates_and_draws(folders, tmp_path, monkeypatch):
    from cameo_bench.engine.build import build_run
    from cameo_bench.engine.loop import fit

    torch.set_num_threads(1)
    read: list[pathlib.Path] = []
    real = scene_dataset.read_image
    monkeypatch.setattr(scene_dataset, "read_image", lambda path, *a, **k: read.append(path) or real(path, *a, **k))
    exp = Experiment(
        name="latent8", output_dir=str(tmp_path),
        backbone=BackboneSpec("mv_unet", "micro"),
        codec=CodecSpec(kind="vae", vae_path=str(folders / "vae"), cache_dir=str(tmp_path / "latents")),
        data=DataSpec(kind="folder", root=str(folders / "scenes"), num_views=3, num_ref=1, image_size=64, batch_size=2),
        cameo=CameoSpec(weight=0.5, layer="decoder:1/16", source="depth", head="mlp"),
        train=TrainSpec(steps=2, progress=False, checkpoint_every=0),
        eval=EvalSpec(every=2, at_start=False, num_scenes=1, batch_size=1, sampler_steps=2, lpips=False),
    )
    run = build_run(exp)
    assert run.codec.downsample == 8 and run.model.config.in_channels == 4 and run.layer == "up.00.attn.00"
    tracker = FileTracker()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="eval figures")  # a figure that fails to draw fails the test
        metrics = fit(run, trackers=[tracker])
    assert math.isfinite(metrics["eval/psnr"])
    layer_keys = [k for k in metrics if "up.00.attn.00" in k and k.endswith("pck@1")]
    assert layer_keys, sorted(metrics)
    assert {p.name for p in tracker.files} >= {"samples.png", "attention.png"}
    assert all(p.exists() for p in tracker.files)
    train_scenes = set(run.train_set.dataset.scene_ids)
    assert read and all(path.parent.parent.name not in train_scenes for path in read), read  # eval images only
    assert len(list((tmp_path / "latents").rglob("*.safetensors"))) > 0
