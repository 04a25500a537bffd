"""The GPU cost check (`tests/benchmarks/gpu_check.sh`) works end to end before anyone spends GPU
time on it: the dry run (micro shapes on CPU, every part, through the shell script) writes the JSON
and the table; the paper-scale configuration points at the layer the paper supervises; and a part
that runs out of memory is recorded while the rest of the run goes on.
"""
from __future__ import annotations

import importlib.util
import json
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

from backbones import create_backbone

BENCH = pathlib.Path(__file__).parent / "benchmarks"


def load_gpu_check():
    if "gpu_check" in sys.modules:
        return sys.modules["gpu_check"]
    spec = importlib.util.spec_from_file_location("gpu_check", BENCH / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_dry_run_writes_json_and_table(tmp_path):
    out = tmp_path / "gpu_check"
    done = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"results -> {out}" in done.stdout

    summary = json.loads((out / "gpu_check.json").read_text())
    parts = summary["parts"]
    assert summary["failed"] == [], {n: parts[n].get("traceback") for n in summary["failed"]}
    assert set(parts) == {"cat3d_sd21_baseline", "cat3d_sd21_cameo", "mvdit_xl2_baseline", "mvdit_xl2_cameo",
                          "unet_baseline", "unet_cameo", "dit_baseline", "dit_cameo", "loss_chunked", "loss_naive",
                          "loss_sparse", "loss_chunked_mean", "loss_naive_mean", "loss_sparse_mean"}
    for name in ("unet_cameo", "dit_cameo"):
        step = parts[name]
        # micro shapes: 16 px latents, 3 views, the supervised layer at stride 2 -> 3 x 8 x 8 tokens
        assert step["tokens"] == 3 * 8 * 8 and step["precision"] == "bf16" and step["gradient_checkpointing"]
        assert step["loss_cameo"] > 0 and step["median_s"] > 0 and step["peak_mb"] > 0
    assert parts["unet_baseline"]["loss_cameo"] is None
    for recipe in ("cat3d_sd21", "mvdit_xl2"):
        # the recipe as shrunk for CI: 64 px images through the random micro VAE -> 8x8x4 latents, 4 views
        step = parts[f"{recipe}_cameo"]
        assert step["shrink"] and (step["image_size"], step["input_size"], step["latent_channels"]) == (64, 8, 4)
        assert step["views"] == 4 and step["precision"] == "bf16" and step["cameo"]["head"] == "mlp"
        assert step["loss_cameo"] > 0 and step["tokens_per_s"] > 0
        assert parts[f"{recipe}_baseline"]["loss_cameo"] is None
    assert parts["cat3d_sd21_cameo"]["layer"] == "up.00.attn.00"  # decoder:1/16 on the micro UNet
    # The chunked loss and the naive full map are the same number (computed independently).
    assert summary["ratios"]["loss_abs_diff"] < 1e-4
    assert summary["ratios"]["loss_abs_diff_sparse"] < 1e-4 and summary["ratios"]["loss_abs_diff_sparse_mean"] < 1e-4
    for backbone in ("unet", "dit"):
        assert summary["ratios"][backbone]["time"] > 0

    table = (out / "gpu_check.md").read_text()
    assert "| mv_unet micro | up.00.attn.00" in table and "| mv_dit micro |" in table
    assert "| cat3d_sd21 | mv_unet micro, 64 px -> 8x8x4 |" in table and "| mvdit_xl2 | mv_dit micro" in table
    assert "naive full map" in table and "Not measured" not in table


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_paper_scale_supervises_a_32x32_layer_of_4_views(backbone):
    """cameo_method.md: SD-2.1 CAT3D at 64x64 latents supervises layer index 10, the first 32x32
    decoder attention (640 channels = 10 heads x 64); the DiT-B/2 check uses 64x64x4 latents at
    patch 2, also 32x32 tokens per view. Built on the meta device: no memory, no init cost."""
    scale = load_gpu_check().SCALES["paper"]
    choice = scale.unet if backbone == "unet" else scale.dit
    with torch.device("meta"):
        model = create_backbone(choice.name, choice.preset, **choice.overrides)
    layer = model.get_attention_layer(model.resolve_layer(choice.layer))
    assert scale.image_size // layer.stride == 32 and scale.views == 4
    assert layer.cross_view and layer.head_dim == 64
    if backbone == "unet":
        assert (layer.name, layer.index, layer.num_heads) == ("up.02.attn.00", 10, 10)
        assert len(model.attention_layers()) == 16
    else:
        assert layer.num_heads == 12 and model.config.in_channels == 4


def test_recipe_parts_at_full_shape_are_the_recipes_with_random_weights(tmp_path, monkeypatch):
    """What the GPU run of each recipe trains: the gin file's own backbone, latents, layer and loss,
    only the weights (random), the data (synthetic at the recipe's size) and evaluation replaced."""
    gpu_check = load_gpu_check()
    paper = gpu_check.SCALES["paper"]
    monkeypatch.setattr(gpu_check, "random_vae_folder", lambda workdir, full: str(tmp_path / "vae"))  # no 300 MB VAE
    sd = gpu_check.recipe_experiment("cat3d_sd21", True, paper, tmp_path, shrink=False)
    assert (sd.backbone.preset, sd.backbone.init_from, sd.codec.kind, sd.data.kind) == ("sd21", "", "vae", "synthetic")
    assert (sd.data.image_size, sd.data.num_views, sd.data.batch_size, sd.cameo.weight) == (512, 4, 3, 0.02)
    assert (sd.train.precision, sd.backbone.gradient_checkpointing, sd.eval.every) == ("bf16", True, 0)
    dit = gpu_check.recipe_experiment("mvdit_xl2", False, paper, tmp_path, shrink=False)
    assert (dit.backbone.preset, dit.data.image_size, dit.cameo.weight, dit.diffusion.beta_schedule) == (
        "XL/2", 256, 0.0, "linear")
    with torch.device("meta"):  # 512 px / 8 = 64x64 latents: decoder:1/16 is the paper's layer at 32x32
        unet = create_backbone("mv_unet", "sd21")
    layer = unet.get_attention_layer(unet.resolve_layer(sd.cameo.layer, input_stride=8))
    assert layer.name == "up.02.attn.00" and 512 // 8 // layer.stride == 32


def test_out_of_memory_part_is_recorded_and_summarized(tmp_path):
    gpu_check = load_gpu_check()

    def runs_out_of_memory(name, scale, device):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    record = gpu_check.run_part("loss_naive", "micro", torch.device("cpu"), tmp_path, measure=runs_out_of_memory)
    assert record["status"] == "oom" and "Tried to allocate" in record["error"]
    assert json.loads((tmp_path / "parts" / "loss_naive.json").read_text())["status"] == "oom"
    ok = gpu_check.run_part("loss_chunked", "micro", torch.device("cpu"), tmp_path,
                            measure=lambda name, scale, device: dict(median_s=0.5, extra_mb=100.0, loss=1.0))
    assert ok["status"] == "ok"

    summary = gpu_check.summarize(tmp_path)
    assert summary["parts"]["loss_naive"]["status"] == "oom"
    assert summary["parts"]["unet_cameo"]["status"] == "missing"
    assert summary["ratios"]["loss_naive_over_chunked"]["time"] is None
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| naive full map | OOM | OOM |" in table and "loss_naive (oom" in table
