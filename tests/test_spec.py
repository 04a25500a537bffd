"""Experiment specs: the one baseline rule, and every field checked on construction, with the
binding and the valid values in the message, from Python and through gin.

The valid values below are written out here from the docs (design.md, the loss options), not
read from the spec, so that a changed choice list is a visible test change.
"""
import dataclasses
import math
import pathlib

import pytest

from cameo_bench import config
from cameo_bench.config.spec import (BackboneSpec, CameoSpec, DataSpec, DiffusionSpec, EvalSpec, Experiment,
                                     OptimSpec, SpecError, TrackingSpec, TrainSpec, is_baseline)

REPO = pathlib.Path(__file__).resolve().parents[1]
SMOKE = REPO / "gin/experiments/smoke.gin"
CLASSES = {"backbone": BackboneSpec, "data": DataSpec, "diffusion": DiffusionSpec, "cameo": CameoSpec,
           "optim": OptimSpec, "train": TrainSpec, "eval": EvalSpec, "tracking": TrackingSpec}


def build(binding: str, value):
    """The Experiment with one field set from Python (sections are checked when built, cross-section
    rules when the Experiment is)."""
    section, name = binding.split(".")
    if section == "run_experiment":
        return Experiment(**{name: value})
    return Experiment(**{section: CLASSES[section](**{name: value})})


def gin_parse(binding: str, value):
    return config.parse([SMOKE], [f"{binding} = {value!r}"])


# ---------------------------------------------------------------------------------------------
# the baseline rule


@pytest.mark.parametrize("weight, source, baseline", [
    (0.0, "depth", True), (0, "pointmap_nn", True), (0.5, "none", True), (0.0, "none", True),
    (0.5, "depth", False), (1e-9, "shuffled", False),
])
def test_one_baseline_rule_lambda_zero_or_source_none(weight, source, baseline):
    assert is_baseline(weight, source) is baseline
    assert CameoSpec(weight=weight, source=source).enabled is (not baseline)


# ---------------------------------------------------------------------------------------------
# enum-like fields: the message lists every valid value

CHOICES = [
    ("data.kind", "folders", ["synthetic", "folder"]),
    ("diffusion.prediction_type", "sample", ["v_prediction", "epsilon"]),
    ("diffusion.beta_schedule", "cosine", ["scaled_linear", "squaredcos_cap_v2"]),
    ("cameo.head", "mpl", ["mean", "linear", "mlp", "per_head"]),
    ("cameo.normalization", "softmax", ["per_view", "global"]),
    ("cameo.target", "onehot", ["onehot_per_view", "onehot_global", "soft"]),
    ("cameo.loss", "mse", ["ce", "kl", "l1"]),
    ("cameo.query_views", "all", ["references", "targets", "both"]),
    ("cameo.key_views", "all", ["all_but_self", "references"]),
    ("train.nonfinite", "ignore", ["stop", "skip"]),
    ("train.precision", "bf61", ["auto", "fp32", "bf16"]),
]


@pytest.mark.parametrize("binding, bad, valid", CHOICES, ids=[c[0] for c in CHOICES])
def test_bad_choice_lists_the_valid_values_from_python(binding, bad, valid):
    with pytest.raises(SpecError) as err:
        build(binding, bad)
    message = str(err.value)
    assert binding in message and repr(bad) in message
    assert all(repr(v) in message for v in valid), message


@pytest.mark.parametrize("binding, bad, valid", CHOICES, ids=[c[0] for c in CHOICES])
def test_bad_choice_through_gin_is_a_config_error_naming_the_binding(binding, bad, valid):
    with pytest.raises(config.ConfigError) as err:
        gin_parse(binding, bad)
    message = str(err.value)
    assert f"--gin_param {f'{binding} = {bad!r}'!r}" in message, message  # where it was set
    assert binding in message and all(repr(v) in message for v in valid), message


@pytest.mark.parametrize("binding, bad, valid", CHOICES, ids=[c[0] for c in CHOICES])
def test_every_listed_choice_is_accepted(binding, bad, valid):
    for value in valid:
        extra = {"root": "/data"} if binding == "data.kind" else {}  # a folder dataset needs its root
        section, name = binding.split(".")
        CLASSES[section](**{name: value}, **extra)


def test_a_close_typo_is_suggested():
    with pytest.raises(SpecError, match="did you mean 'bf16'"):
        TrainSpec(precision="bf61")


def test_the_loss_offers_the_choices_the_spec_accepts():
    from cameo_bench.config import spec
    from cameo_bench.objectives import alignment

    for name in ("HEADS", "NORMALIZATIONS", "TARGETS", "LOSSES", "QUERY_VIEWS", "KEY_VIEWS"):
        assert set(getattr(alignment, name)) == set(getattr(spec, name)), name


# ---------------------------------------------------------------------------------------------
# ranges and types

RANGES = [
    ("backbone.name", "", "non-empty string"),
    ("backbone.overrides", [("depth", 2)], "dict"),
    ("backbone.gradient_checkpointing", "yes", "True or False"),
    ("data.num_scenes", 0, "integer >= 1"),
    ("data.num_eval_scenes", 0, "integer >= 1"),
    ("data.num_views", 0, "integer >= 1"),
    ("data.num_ref", -1, "integer >= 0"),
    ("data.image_size", 0, "integer >= 1"),
    ("data.batch_size", 0, "integer >= 1"),
    ("data.batch_size", 2.5, "integer >= 1"),
    ("data.azimuth_step_deg", "30", "finite number"),
    ("diffusion.num_train_timesteps", 1, "integer >= 2"),
    ("diffusion.snr_shift", 0.0, "> 0"),
    ("diffusion.camera_dropout", 1.5, "[0.0, 1.0]"),
    ("diffusion.rescale_zero_terminal_snr", "yes", "True or False"),
    ("cameo.weight", -0.1, ">= 0"),
    ("cameo.layer", "", "non-empty string"),
    ("cameo.source_options", ["noise"], "dict"),
    ("cameo.queries_per_view", 0, "None or an integer >= 1"),
    ("cameo.chunk_size", 0, "integer >= 1"),
    ("cameo.log_eps", -1e-8, ">= 0"),
    ("optim.lr", 0.0, "> 0"),
    ("optim.lr", -1e-3, "> 0"),
    ("optim.weight_decay", -0.1, ">= 0"),
    ("optim.betas", (0.9, 1.0), "[0, 1)"),
    ("optim.betas", (0.9,), "two numbers"),
    ("optim.warmup_steps", -1, "integer >= 0"),
    ("optim.grad_clip", -1.0, ">= 0"),
    ("optim.ema_decay", 1.0, "[0.0, 1.0)"),
    ("optim.grad_accum", 0, "integer >= 1"),
    ("train.steps", -5, "integer >= 0"),
    ("train.steps", 2.5, "integer >= 0"),
    ("train.log_every", 0, "integer >= 1"),
    ("train.checkpoint_every", -1, "integer >= 0"),
    ("train.progress", "yes", "True or False"),
    ("eval.every", -1, "integer >= 0"),
    ("eval.num_scenes", 0, "integer >= 1"),
    ("eval.batch_size", 0, "integer >= 1"),
    ("eval.sampler_steps", 0, "integer >= 1"),
    ("eval.guidance_scale", -1.0, ">= 0"),
    ("eval.attention_timestep", -1, "integer >= 0"),
    ("eval.attention", 1, "True or False"),
    ("tracking.enabled", "no", "True or False"),
    ("tracking.experiment", "", "None or a non-empty string"),
    ("run_experiment.seed", 1.5, "integer"),
    ("run_experiment.name", "", "non-empty string"),
]
RANGE_IDS = [f"{b}={v!r}" for b, v, _ in RANGES]


@pytest.mark.parametrize("binding, bad, valid", RANGES, ids=RANGE_IDS)
def test_out_of_range_value_names_field_and_range_from_python(binding, bad, valid):
    with pytest.raises(SpecError) as err:
        build(binding, bad)
    message = str(err.value)
    assert f"{binding} = {bad!r}" in message and valid in message, message


@pytest.mark.parametrize("binding, bad, valid", RANGES, ids=RANGE_IDS)
def test_out_of_range_value_through_gin_names_the_binding(binding, bad, valid):
    with pytest.raises(config.ConfigError) as err:
        gin_parse(binding, bad)
    message = str(err.value)
    assert "--gin_param" in message and f"{binding} = {bad!r}" in message and valid in message, message


@pytest.mark.parametrize("binding, bad", [("cameo.weight", math.inf), ("cameo.weight", math.nan), ("optim.lr", math.nan),
                                          ("data.azimuth_step_deg", math.inf), ("eval.guidance_scale", math.nan)])
def test_non_finite_numbers_are_rejected(binding, bad):
    with pytest.raises(SpecError, match="finite number"):
        build(binding, bad)


CROSS = [  # (bindings, the other field the message must name)
    (["data.num_ref = 3"], "data.num_views = 3"),
    (["data.kind = 'folder'"], "data.root"),
    (["eval.attention_timestep = 1000"], "diffusion.num_train_timesteps = 1000"),
    (["diffusion.num_train_timesteps = 10", "eval.attention_timestep = 5", "eval.sampler_steps = 11"],
     "diffusion.num_train_timesteps = 10"),
    (["diffusion.prediction_type = 'epsilon'", "diffusion.rescale_zero_terminal_snr = True"], "'v_prediction'"),
]


@pytest.mark.parametrize("bindings, other", CROSS, ids=[c[0][-1] for c in CROSS])
def test_fields_that_must_agree_name_both(bindings, other):
    with pytest.raises(config.ConfigError) as err:
        config.parse([SMOKE], bindings)
    message = str(err.value)
    assert other in message and f"--gin_param {bindings[-1]!r}" in message, message


def test_a_bad_value_in_a_gin_file_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.gin"
    bad.write_text(f"include {str(SMOKE)!r}\n\ntrain.steps = -5\n")
    with pytest.raises(config.ConfigError) as err:
        config.parse([bad])
    message = str(err.value)
    assert f"{bad}, line 3" in message and "train.steps = -5" in message and ">= 0" in message, message
    # the command line wins over the file, and the message follows it
    with pytest.raises(config.ConfigError, match="--gin_param 'train.steps = -6'"):
        config.parse([bad], ["train.steps = -6"])


def test_every_field_of_every_spec_has_a_check_and_defaults_pass_it():
    for cls in (*CLASSES.values(), Experiment):
        for f in dataclasses.fields(cls):
            assert callable(f.metadata.get("check")), f"{cls.__name__}.{f.name} has no check"
    exp = Experiment()
    assert not exp.cameo.enabled and exp.cameo.log_eps == 0.0


def test_valid_edge_values_are_accepted():
    """The ends of each range that mean something (0 = off / never / baseline) stay valid."""
    Experiment(train=TrainSpec(steps=0, checkpoint_every=0), eval=EvalSpec(every=0, attention_timestep=999),
               optim=OptimSpec(grad_clip=None, ema_decay=0.0, warmup_steps=0, weight_decay=0.0, betas=[0.0, 0.5]),
               cameo=CameoSpec(weight=0, log_eps=1e-8, queries_per_view=1),
               data=DataSpec(num_views=1, num_ref=0, kind="folder", root="/data"),
               diffusion=DiffusionSpec(camera_dropout=1.0, rescale_zero_terminal_snr=True))
    DiffusionSpec(num_train_timesteps=2, camera_dropout=0.0)
