"""The `cameo-bench` command line: layers listing, train + eval round trip, clear errors."""
import json
import pathlib

import pytest

from cameo_bench.__main__ import main
from cameo_bench.tracking import keys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_layers_lists_sd21_layer_10_as_the_first_32x32_decoder_attention(capsys):
    assert main(["layers", "mv_unet", "--preset", "sd21", "--image-size", "64"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert len(rows) == 16
    index, name, stage, kind, heads, head_dim, stride, res, grid = rows[10]
    assert (name, stage, kind, heads, head_dim, grid) == ("up.02.attn.00", "decoder", "cross-view", "10", "64", "32x32")


def test_layers_unknown_backbone_lists_valid_names():
    with pytest.raises(KeyError, match="mv_dit"):
        main(["layers", "mv_ditt"])


def test_train_then_eval_round_trip(tmp_path, capsys):
    out = f"run_experiment.output_dir = '{tmp_path}'"
    assert main(["train", str(REPO / "gin/experiments/smoke.gin"), "--no-progress", "--no-tracking", "--gin_param", out,
                 "--gin_param", "train.steps = 2", "--gin_param", "eval.every = 0"]) == 0
    run_dir = tmp_path / "smoke"
    assert (run_dir / "config.gin").read_text().count("cameo.weight") == 1
    capsys.readouterr()
    assert main(["eval", str(run_dir)]) == 0
    metrics = json.loads((run_dir / "eval.json").read_text())
    assert metrics["step"] == 2 and 0 < metrics["eval/psnr"] < 60 and keys.SUPERVISED_PCK1 in metrics


def test_train_reports_gin_typo_with_file_and_exit_code_2(tmp_path, capsys):
    bad = tmp_path / "bad.gin"
    bad.write_text("include 'gin/experiments/smoke.gin'\ncameo.wieght = 0.1\n")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "wieght" in err and "weight" in err


def test_eval_never_deletes_or_changes_the_run_files(tmp_path, capsys):
    """`cameo-bench eval` only adds eval.json: building the run to evaluate it used to open a fresh
    run log, which deleted the run's metrics.jsonl."""
    out = f"run_experiment.output_dir = '{tmp_path}'"
    assert main(["train", str(REPO / "gin/experiments/smoke.gin"), "--no-progress", "--no-tracking", "--gin_param", out,
                 "--gin_param", "train.steps = 1", "--gin_param", "eval.every = 0"]) == 0
    run_dir = tmp_path / "smoke"
    before = {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    assert pathlib.Path("metrics.jsonl") in before and b"train/loss_diffusion" in before[pathlib.Path("metrics.jsonl")]
    assert main(["eval", str(run_dir), "--gin_param", "eval.attention = False"]) == 0
    after = {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    assert set(after) - set(before) == {pathlib.Path("eval.json")}
    assert {k: after[k] for k in before} == before
    assert json.loads(after[pathlib.Path("eval.json")])["step"] == 1
