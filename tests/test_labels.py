"""Run labels (`cameo_bench.tracking.labels.run_label`) from flattened params, as trackers store them."""
import subprocess
import sys

import pytest

from cameo_bench.tracking.labels import run_label


def params(name="mv_dit", preset="tiny", weight="0.5", source="depth", layer="depth:0.5", **extra):
    return {"backbone.name": name, "backbone.preset": preset, "cameo.weight": weight, "cameo.source": source,
            "cameo.layer": layer, "backbone.overrides": "{'patch_size': 4}", **extra}


@pytest.mark.parametrize("name, preset", [("mv_dit", "tiny"), ("mv_unet", "micro")])
def test_baselines_name_backbone_and_preset_only(name, preset):
    assert run_label(params(name, preset, weight="0.0")) == f"{name} {preset} | baseline"
    assert run_label(params(name, preset, weight="0")) == f"{name} {preset} | baseline"
    # source `none` trains no CAMEO whatever the weight; a layer passed in does not make it CAMEO
    assert run_label(params(name, preset, weight="0.5", source="none"), "blocks.02.attn") == f"{name} {preset} | baseline"


@pytest.mark.parametrize("name, preset, layer", [("mv_dit", "tiny", "blocks.02.attn"), ("mv_unet", "sd21", "up.02.attn.00")])
def test_cameo_runs_name_weight_and_resolved_layer(name, preset, layer):
    assert run_label(params(name, preset), layer) == f"{name} {preset} | CAMEO λ=0.5 @ {layer}"
    assert run_label(params(name, preset, weight="0.016"), layer) == f"{name} {preset} | CAMEO λ=0.016 @ {layer}"
    assert run_label(params(name, preset, weight="5e-01"), layer) == f"{name} {preset} | CAMEO λ=0.5 @ {layer}"


def test_the_layer_comes_from_the_logged_resolution_else_the_selector():
    assert run_label(params(**{"cameo.layer_resolved": "blocks.01.attn"})) == "mv_dit tiny | CAMEO λ=0.5 @ blocks.01.attn"
    assert run_label(params(**{"cameo.layer_resolved": "blocks.01.attn"}), "blocks.03.attn").endswith("@ blocks.03.attn")
    assert run_label(params(**{"cameo.layer_resolved": "none"})) == "mv_dit tiny | CAMEO λ=0.5 @ depth:0.5"
    assert run_label(params()) == "mv_dit tiny | CAMEO λ=0.5 @ depth:0.5"


def test_a_weight_that_is_not_a_number_is_named():
    with pytest.raises(ValueError, match=r"cameo.weight = 'lots'"):
        run_label(params(weight="lots"))


def test_labels_import_neither_mlflow_nor_torch():
    code = ("import sys, cameo_bench.tracking.labels; "
            "print(sorted(m for m in ('mlflow', 'torch', 'gin') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
