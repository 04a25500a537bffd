"""gin configuration: every shipped file parses, and mistakes are reported with file and binding."""
import pathlib

import pytest

from cameo_bench import config
REPO = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((REPO / "gin" / "experiments").glob("*.gin"))
FRAGMENTS = sorted((REPO / "gin" / "backbones").glob("*.gin")) + sorted((REPO / "gin" / "data").glob("*.gin"))


@pytest.mark.parametrize("path", EXPERIMENTS + FRAGMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_gin_file_parses(path):
    exp = config.parse([path])
    assert exp.backbone.name  # a plain-value experiment came out


@pytest.mark.parametrize("path", sorted(REPO.glob("gin/**/*.gin")), ids=lambda p: str(p.relative_to(REPO)))
def test_every_gin_file_starts_with_its_purpose(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and len(first) > 20


def test_smoke_values_reach_the_experiment():
    exp = config.parse([REPO / "gin/experiments/smoke.gin"], ["cameo.weight = 0.25", "train.steps = 7"])
    assert exp.name == "smoke" and exp.cameo.weight == 0.25 and exp.train.steps == 7
    assert exp.backbone.preset == "micro" and exp.data.image_size == 16


def test_typo_in_scope_names_file_binding_and_suggests(tmp_path):
    bad = tmp_path / "bad.gin"
    bad.write_text("train.steps = 3\ntrian.steps = 4\n")
    with pytest.raises(config.ConfigError) as err:
        config.parse([bad])
    message = str(err.value)
    assert str(bad) in message and "trian" in message and "line 2" in message and "train" in message


def test_typo_in_parameter_lists_valid_parameters(tmp_path):
    bad = tmp_path / "bad.gin"
    bad.write_text("cameo.wieght = 0.1\n")
    with pytest.raises(config.ConfigError) as err:
        config.parse([bad])
    message = str(err.value)
    assert str(bad) in message and "wieght" in message and "'weight'" in message


def test_bad_command_line_binding_is_named():
    with pytest.raises(config.ConfigError, match="train.stepz"):
        config.parse([REPO / "gin/experiments/smoke.gin"], ["train.stepz = 3"])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(config.ConfigError, match="nope.gin"):
        config.parse([tmp_path / "nope.gin"])


def test_a_spec_field_outside_its_values_is_a_config_error_naming_binding_and_valid_values():
    with pytest.raises(config.ConfigError) as err:
        config.parse([REPO / "gin/experiments/smoke.gin"], ["train.precision = 'bf61'"])
    message = str(err.value)
    assert "train.precision = 'bf61'" in message and all(v in message for v in ("'auto'", "'fp32'", "'bf16'"))
    with pytest.raises(config.ConfigError, match=r"train.steps = -5 .*>= 0"):
        config.parse([REPO / "gin/experiments/smoke.gin"], ["train.steps = -5"])


def test_sweep_files_are_read_without_binding_anything(tmp_path):
    path = tmp_path / "s.gin"
    path.write_text("sweep.name = 's'\nsweep.base = ['gin/experiments/smoke.gin']\nsweep.axes = {'cameo.weight': [0.0]}\n")
    config.parse([REPO / "gin/experiments/smoke.gin"], ["train.steps = 7"])
    values = config.parse_sweep(path, ["sweep.workers = 3"])
    assert values == {"name": "s", "base": ["gin/experiments/smoke.gin"], "axes": {"cameo.weight": [0.0]}, "workers": 3}
    assert "train.steps = 7" in config.config_str()  # gin's state is untouched by reading a sweep file
