"""The training loop end to end on the micro DiT: smoke, validation, NaN stop, kill + resume."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch

from cameo_bench.engine import checkpoint
from cameo_bench import config
from cameo_bench.tracking.run_log import read_metrics
from cameo_bench.tracking import keys
from cameo_bench.engine.build import ExperimentError, build_run
from cameo_bench.engine.loop import fit
from cameo_bench.engine.step import NonFiniteLossError

REPO = pathlib.Path(__file__).resolve().parents[1]
SMOKE = REPO / "gin/experiments/smoke.gin"


def smoke(tmp_path, *bindings):
    exp = config.parse([SMOKE], [f"run_experiment.output_dir = '{tmp_path}'", "train.progress = False", *bindings])
    return exp


@pytest.mark.parametrize("backbone", ["mv_dit", "mv_unet"])
def test_smoke_run_logs_losses_eval_and_checkpoint(tmp_path, backbone):
    exp = smoke(tmp_path, f"backbone.name = '{backbone}'")
    metrics = fit(build_run(exp))
    assert "eval/psnr" in metrics and "eval/ssim" in metrics
    assert any(k.startswith(keys.ATTN) and k.endswith("/pck@1") for k in metrics)
    history = read_metrics(tmp_path / "smoke")
    assert len(history["train/loss_diffusion"]) == 4 and len(history["train/loss_cameo"]) == 4
    assert all(torch.isfinite(torch.tensor(v)) for _, v in history["train/loss_cameo"])
    payload = checkpoint.load(tmp_path / "smoke" / "checkpoints")
    assert payload["step"] == 4 and payload["data_position"] == 4 * exp.data.batch_size


def test_baseline_runs_without_tap_or_cameo_loss(tmp_path):
    run = build_run(smoke(tmp_path, "cameo.weight = 0.0", "eval.every = 0"))
    assert run.cameo_loss is None and run.layer is None
    fit(run)
    history = read_metrics(tmp_path / "smoke")
    assert "train/loss_cameo" not in history and len(history["train/loss_diffusion"]) == 4


@pytest.mark.parametrize("binding, message", [
    ("cameo.weight = -0.1", "cameo.weight"),
    ("cameo.layer = 'blocks.99.attn'", "Valid layers"),
    ("cameo.source = 'depht'", "depth"),
])
def test_invalid_values_fail_before_training(tmp_path, binding, message):
    with pytest.raises((ExperimentError, KeyError, ValueError), match=message):
        build_run(smoke(tmp_path, binding))
    assert not (tmp_path / "smoke" / "checkpoints").exists()


def test_nonfinite_loss_stops_with_step_term_and_checkpoint(tmp_path, monkeypatch):
    run = build_run(smoke(tmp_path, "eval.every = 0", "train.checkpoint_every = 0"))
    original = run.diffusion.training_loss

    def poisoned(*args, **kwargs):
        loss, aux = original(*args, **kwargs)
        return loss * float("nan") if run.state.step == 2 else loss, aux

    monkeypatch.setattr(run.diffusion, "training_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"diffusion.*step 2"):
        fit(run)
    assert checkpoint.load(tmp_path / "smoke" / "checkpoints")["step"] == 2
    assert json.loads((tmp_path / "smoke" / "status.json").read_text())["status"] == "FAILED"


def _final_state(run_dir):
    payload = checkpoint.load(run_dir / "checkpoints")
    return payload["model"], read_metrics(run_dir)


@pytest.mark.slow
def test_resume_after_kill_equals_uninterrupted_run(tmp_path):
    """Kill a real training subprocess after a checkpoint, resume, compare with a straight run."""
    steps = ["train.steps = 8", "train.checkpoint_every = 2", "eval.every = 4", "train.log_every = 1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    def cmd(out, *extra):
        args = [sys.executable, "-m", "cameo_bench", "train", str(SMOKE), "--no-progress", "--no-tracking",
                "--gin_param", f"run_experiment.output_dir = '{out}'"]
        for b in steps:
            args += ["--gin_param", b]
        return args + list(extra)

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(cmd(straight), check=True, env=env, cwd=REPO, capture_output=True)

    proc = subprocess.Popen(cmd(killed), env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = killed / "smoke" / "checkpoints" / checkpoint.LATEST
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and checkpoint.load(latest)["step"] >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.load(latest)["step"] < 8, "the run finished before it could be killed"
    subprocess.run(cmd(killed, "--resume"), check=True, env=env, cwd=REPO, capture_output=True)

    model_a, metrics_a = _final_state(straight / "smoke")
    model_b, metrics_b = _final_state(killed / "smoke")
    for key in model_a:
        assert torch.equal(model_a[key], model_b[key]), key
    for key in ("eval/psnr", "train/loss_diffusion", "train/loss_cameo"):
        assert metrics_a[key] == metrics_b[key], key
