"""Run labels, tags and logged params (`cameo_bench.tracking.labels`) from flattened params, as trackers store them."""
import subprocess
import sys

import pytest

from cameo_bench.tracking.labels import honest_params, label_extras, label_tags, run_label


def params(name="mv_dit", preset="tiny", weight="0.5", source="depth", layer="depth:0.5", seed="0", **extra):
    out = {"backbone.name": name, "backbone.preset": preset, "cameo.weight": weight, "cameo.source": source,
           "cameo.layer": layer, "backbone.overrides": "{'patch_size': 4}", "cameo.head": "mean", **extra}
    if seed is not None:
        out["seed"] = seed
    return out


@pytest.mark.parametrize("name, preset", [("mv_dit", "tiny"), ("mv_unet", "micro")])
def test_baselines_name_backbone_preset_and_seed_only(name, preset):
    assert run_label(params(name, preset, weight="0.0")) == f"{name} {preset} · baseline · s0"
    assert run_label(params(name, preset, weight="0", seed="2")) == f"{name} {preset} · baseline · s2"
    # source `none` trains no CAMEO whatever the weight; a layer passed in does not make it CAMEO
    assert run_label(params(name, preset, source="none"), "blocks.02.attn") == f"{name} {preset} · baseline · s0"


@pytest.mark.parametrize("name, preset, layer", [("mv_dit", "tiny", "blocks.02.attn"), ("mv_unet", "sd21", "up.02.attn.00")])
def test_cameo_runs_name_weight_and_resolved_layer(name, preset, layer):
    assert run_label(params(name, preset), layer) == f"{name} {preset} · CAMEO λ0.5 @{layer} · s0"
    assert run_label(params(name, preset, weight="0.016"), layer) == f"{name} {preset} · CAMEO λ0.016 @{layer} · s0"
    assert run_label(params(name, preset, weight="5e-01"), layer) == f"{name} {preset} · CAMEO λ0.5 @{layer} · s0"


def test_the_parts_that_tell_runs_apart_come_first_and_a_truncated_label_still_differs():
    """The UI's run column shows ~25 characters: the four quickstart runs must differ there."""
    labels = [run_label(params("mv_dit", "tiny", weight="0")), run_label(params("mv_dit", "tiny"), "blocks.02.attn"),
              run_label(params("mv_unet", "tiny", weight="0")), run_label(params("mv_unet", "tiny"), "up.01.attn.00")]
    assert len({label[:22] for label in labels}) == 4
    assert all("name=" not in label and "{" not in label for label in labels)


def test_the_layer_comes_from_the_logged_resolution_else_the_selector():
    assert run_label(params(**{"cameo.layer_resolved": "blocks.01.attn"})) == "mv_dit tiny · CAMEO λ0.5 @blocks.01.attn · s0"
    assert run_label(params(**{"cameo.layer_resolved": "blocks.01.attn"}), "blocks.03.attn").endswith("@blocks.03.attn · s0")
    assert run_label(params(**{"cameo.layer_resolved": "none"})) == "mv_dit tiny · CAMEO λ0.5 @depth:0.5 · s0"
    assert run_label(params(seed=None)) == "mv_dit tiny · CAMEO λ0.5 @depth:0.5"  # stores from before the seed param


def test_a_source_other_than_depth_and_extra_axes_are_named_before_the_seed():
    assert run_label(params(source="pointmap_nn"), "blocks.02.attn") == \
        "mv_dit tiny · CAMEO λ0.5 @blocks.02.attn from pointmap_nn · s0"
    assert run_label(params(), "b", ["queries_per_view=64"]) == "mv_dit tiny · CAMEO λ0.5 @b · queries_per_view=64 · s0"


def test_label_extras_skip_what_the_label_says():
    bindings = {"backbone.name": "'mv_dit'", "backbone.overrides": "{'patch_size': 4}", "cameo.weight": "0.5",
                "cameo.layer": "'depth:0.5'", "cameo.source": "'depth'", "run_experiment.seed": "1",
                "cameo.queries_per_view": "64", "data.num_views": "3", "cameo.head": "'mlp'"}
    assert label_extras(list(bindings), bindings) == ["queries_per_view=64", "num_views=3", "head=mlp"]


def test_tags_group_the_runs_table_and_a_baseline_names_no_layer_or_source():
    assert label_tags(params(seed="3"), "blocks.02.attn") == {
        "variant": "cameo", "backbone": "mv_dit", "preset": "tiny", "layer": "blocks.02.attn", "lambda": "0.5",
        "source": "depth", "seed": "3"}
    assert label_tags(params(layer="depth:0.5"))["layer"] == "depth:0.5"  # before the model resolves it
    base = label_tags(params("mv_unet", weight="0.0"), "up.01.attn.00")
    assert base == {"variant": "baseline", "backbone": "mv_unet", "preset": "tiny", "layer": "none", "lambda": "0",
                    "source": "none", "seed": "0"}
    assert label_tags(params(source="none"))["lambda"] == "0"  # no loss: its weight weighs nothing


def test_a_baseline_logs_none_for_every_cameo_setting_it_never_used():
    """The collapsed mv_unet baseline of the quickstart used to log `cameo.layer = depth:0.5`, the DiT arm's."""
    base = honest_params(params("mv_unet", weight="0.0", layer="depth:0.5"))
    assert base["cameo.layer"] == base["cameo.source"] == base["cameo.head"] == "none"
    assert base["cameo.weight"] == "0.0" and base["backbone.name"] == "mv_unet" and base["seed"] == "0"
    by_source = honest_params(params(weight="0.5", source="none"))
    assert by_source["cameo.weight"] == "0.5" and by_source["cameo.source"] == "none"
    assert run_label(by_source) == "mv_dit tiny · baseline · s0"  # still a baseline under the one rule
    cameo = params()
    assert honest_params(cameo) == cameo


def test_a_weight_that_is_not_a_number_is_named():
    with pytest.raises(ValueError, match=r"cameo.weight = 'lots'"):
        run_label(params(weight="lots"))


def test_labels_import_neither_mlflow_nor_torch():
    code = ("import sys, cameo_bench.tracking.labels; "
            "print(sorted(m for m in ('mlflow', 'torch', 'gin') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
