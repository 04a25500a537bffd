"""MLflow tracking: buffered metrics, run status on success and failure, resume into the same run,
the `cameo-bench train` wiring, the figures logged at evaluation, and the UI launcher.

Every test gets its own sqlite store, copied from an empty one (creating the schema runs ~100
migrations: 5-20 s on a busy 2-core box; copying the file is instant). The empty store is kept in
pytest's cache, one per MLflow version, so only the first session pays for it.
"""
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from matplotlib.image import imread
from mlflow.tracking import MlflowClient

from cameo_bench.evaluation import figures as artifacts
from cameo_bench.engine import tracked_run as launch
from cameo_bench import tracking
from cameo_bench.tracking import keys
from cameo_bench.tracking import ui as tracking_ui
from cameo_bench.cli import train as train_cli

REPO = pathlib.Path(__file__).resolve().parents[1]
SMOKE = REPO / "gin/experiments/smoke.gin"


@pytest.fixture(scope="module")
def template_db(request, tmp_path_factory):
    from importlib import metadata

    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    folder = pathlib.Path(cache.mkdir("mlflow-template")) if cache else tmp_path_factory.mktemp("template")
    path = folder / f"empty-mlflow-{metadata.version('mlflow-skinny')}.db"
    if not path.exists():
        fresh = tmp_path_factory.mktemp("fresh") / "not" / "yet" / "mlflow.db"  # ensure_store makes the folders
        tracking.ensure_store(f"sqlite:///{fresh}")
        assert fresh.is_file()
        shutil.copy(fresh, path.with_suffix(".partial"))
        os.replace(path.with_suffix(".partial"), path)
    return path


@pytest.fixture
def store(tmp_path, monkeypatch, template_db):
    shutil.copy(template_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri


@pytest.fixture
def calls(monkeypatch):
    """Counts the metric-carrying log_batch requests; one log_metric per value is forbidden."""
    seen = {"metric_batches": [], "param_batches": 0}
    original = MlflowClient.log_batch

    def log_batch(self, run_id, metrics=(), params=(), tags=(), synchronous=None):
        if metrics:
            seen["metric_batches"].append(len(metrics))
        if params:
            seen["param_batches"] += 1
        return original(self, run_id, metrics=metrics, params=params, tags=tags, synchronous=synchronous)

    def log_metric(*args, **kwargs):
        raise AssertionError("log_metric called: metrics must go through log_batch")

    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
    monkeypatch.setattr(MlflowClient, "log_metric", log_metric)
    return seen


def history(uri, run_id, key):
    return [(m.step, m.value) for m in sorted(MlflowClient(uri).get_metric_history(run_id, key), key=lambda m: m.step)]


# ---------------------------------------------------------------------------------------------
# store and URIs


def test_default_store_is_sqlite_in_cwd_with_artifacts_next_to_it(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.default_tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    assert tracking.default_artifact_root() == (tmp_path / "mlruns").as_uri()
    assert tracking.sqlite_path("sqlite:////data/x/m.db") == pathlib.Path("/data/x/m.db")
    assert tracking.sqlite_path("sqlite:///rel/m.db") == tmp_path / "rel" / "m.db"
    assert tracking.default_artifact_root("sqlite:////data/x/m.db") == "file:///data/x/mlruns"
    assert tracking.default_artifact_root("http://127.0.0.1:5000") is None  # the server decides
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/t.db")
    assert tracking.default_tracking_uri() == "sqlite:////elsewhere/t.db"


def test_the_package_exports_every_name_and_a_run_folder_reads_without_mlflow():
    names = ["default_tracking_uri", "sqlite_path", "default_artifact_root", "ensure_store", "get_or_create_experiment",
             "git_tags", "environment_tags", "MlflowTracker", "to_mlflow_key", "from_mlflow_key", "RunRecord",
             "load_runs", "fetch_artifact", "TERMINAL_STATUSES", "find_runs", "start_parent_run", "create_failed_run",
             "end_run", "clear_error", "log_run_text", "RUN_ID_FILE", "MAX_BATCH", "PACKAGES", "MAX_TAG_CHARS",
             "RunLog", "read_metrics", "run_label", "find_equivalent", "copy_run", "final_eval_metrics",
             "Archive", "export_experiment", "read_archive", "import_archive"]
    assert sorted(names) == tracking.__all__
    for name in names:
        assert getattr(tracking, name) is not None, name
    assert tracking.TERMINAL_STATUSES == ("FINISHED", "FAILED", "KILLED")
    assert not hasattr(tracking, "TERMINAL")  # it was a second copy of the same tuple
    code = ("import sys; from cameo_bench import tracking; tracking.read_metrics, tracking.RunLog, tracking.run_label; "
            "from cameo_bench.tracking import keys, key_escape; print('mlflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.strip() == "False"


# ---------------------------------------------------------------------------------------------
# the tracker


def test_params_tags_and_buffered_metrics(store, calls, tmp_path):
    params = {f"section{i // 10}.key{i}": i * 0.5 for i in range(150)}  # > 100: two LogBatch requests
    tracker = tracking.MlflowTracker("exp", "run-a", run_dir=tmp_path / "run", tags={"variant": "cameo"})
    tracker.log_params(params)
    for step in range(1, 6):
        tracker.log_metrics({"train/loss": 1.0 / step, "attn/l/pck@1": 0.1 * step}, step)
    client = MlflowClient(store)
    assert client.get_run(tracker.run_id).data.metrics == {}, "train metrics must wait in the buffer"
    assert calls["metric_batches"] == []
    tracker.log_metrics({"eval/psnr": 12.5, "eval/lpips": float("nan")}, 5)  # an eval flushes at once
    assert calls["metric_batches"] == [12]
    tracker.log_metrics({"train/loss": 0.1}, 6)
    tracker.finish()
    assert calls["metric_batches"] == [12, 1] and calls["param_batches"] == 2

    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {k: str(v) for k, v in params.items()}
    assert history(store, tracker.run_id, "train/loss") == [(s, 1.0 / s) for s in range(1, 6)] + [(6, 0.1)]
    assert history(store, tracker.run_id, "attn/l/pck_at_1")[-1] == (5, pytest.approx(0.5))
    assert math.isnan(history(store, tracker.run_id, "eval/lpips")[0][1])
    assert (tmp_path / "run" / tracking.RUN_ID_FILE).read_text() == tracker.run_id

    tags = run.data.tags
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=REPO).returncode != 0
    assert tags["git.sha"] == sha and len(sha) == 40
    assert tags["git.dirty"] == str(dirty).lower()
    assert tags["variant"] == "cameo" and tags["mlflow.runName"] == "run-a"
    assert run.info.artifact_uri.startswith((tmp_path / "mlruns").as_uri())


def test_environment_tags_name_host_device_and_versions():
    import socket

    tags = tracking.environment_tags("cuda:1")
    assert tags["host"] == socket.gethostname() and tags["device"] == "cuda:1"
    assert tags["version.torch"] == torch.__version__.split("+")[0]
    assert "version.mlflow-skinny" in tags and "version.gin-config" in tags


@pytest.mark.parametrize("status, error, expected", [
    ("FINISHED", None, "FINISHED"),
    ("KILLED", "KeyboardInterrupt: ", "KILLED"),
    ("FAILED", "RuntimeError: boom", "FAILED"),
    ("crashed", None, "FAILED"),  # an unknown status is a failure, never silently FINISHED
])
def test_finish_marks_the_status_and_keeps_buffered_metrics(store, calls, status, error, expected):
    tracker = tracking.MlflowTracker("exp", "run")
    tracker.log_metrics({"train/loss": 2.0}, 1)
    tracker.log_metrics({"train/loss": 1.0}, 2)
    tracker.finish(status, error)
    run = MlflowClient(store).get_run(tracker.run_id)
    assert run.info.status == expected
    assert history(store, tracker.run_id, "train/loss") == [(1, 2.0), (2, 1.0)]
    if error:
        assert run.data.tags["error"] == error
    if status == "crashed":
        assert "crashed" in run.data.tags["error"]


def test_a_flush_that_fails_keeps_the_metrics_and_fails_the_run(store, monkeypatch):
    tracker = tracking.MlflowTracker("exp", "run")
    tracker.log_metrics({"train/loss": 2.0}, 1)
    original = MlflowClient.log_batch

    def broken(self, run_id, metrics=(), **kwargs):
        if metrics:
            raise RuntimeError("database is locked")
        return original(self, run_id, metrics=metrics, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", broken)
    with pytest.raises(RuntimeError, match="locked"):
        tracker.flush()
    assert len(tracker._metrics) == 1, "metrics of a failed flush stay buffered for the next one"
    with pytest.raises(RuntimeError, match="locked"):
        tracker.finish()
    run = MlflowClient(store).get_run(tracker.run_id)
    assert run.info.status == "FAILED" and "database is locked" in run.data.tags["error"]


def test_resume_continues_the_same_run(store, tmp_path, capsys):
    run_dir = tmp_path / "runs" / "x"
    first = tracking.MlflowTracker("exp", "x", run_dir=run_dir)
    first.log_params({"train.steps": 4, "cameo.weight": 0.5})
    first.log_metrics({"train/loss": 3.0}, 1)
    first.flush()  # a checkpoint; then the process is killed: no finish, the run stays RUNNING
    second = tracking.MlflowTracker("exp", "x", run_dir=run_dir, resume=True)
    assert second.run_id == first.run_id
    second.log_params({"train.steps": 8, "cameo.weight": 0.5, "new.key": 1})  # immutable: no error
    assert "keeps its logged values of ['train.steps']" in capsys.readouterr().err
    second.log_metrics({"train/loss": 2.0}, 2)
    second.finish()
    run = MlflowClient(store).get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.steps": "4", "cameo.weight": "0.5", "new.key": "1"}
    assert history(store, first.run_id, "train/loss") == [(1, 3.0), (2, 2.0)]
    # not resuming, or a folder naming a run of another store: a new run
    assert tracking.MlflowTracker("exp", "x", run_dir=run_dir).run_id != first.run_id
    (run_dir / tracking.RUN_ID_FILE).write_text("0" * 32)
    assert tracking.MlflowTracker("exp", "x", run_dir=run_dir, resume=True).run_id != "0" * 32


def test_operative_config_waits_for_the_first_step():
    logged = []

    class Fake:
        def log_text(self, text, name):
            logged.append((name, text))

    record = launch.OperativeConfigLog(Fake(), lambda: f"config after {len(logged)} logs")
    record.log_params({"a": 1})
    record.log_metrics({"eval/psnr": 1.0}, 0)  # evaluation before training: not yet
    assert logged == []
    record.log_metrics({"train/loss": 1.0}, 1)
    record.log_metrics({"train/loss": 1.0}, 2)
    record.finish()
    assert logged == [("config/operative.gin", "config after 0 logs")]
    early = launch.OperativeConfigLog(Fake(), lambda: "early")
    early.finish("FAILED", "boom")  # a run that died before its first step still gets it
    assert logged[-1] == ("config/operative.gin", "early")


# ---------------------------------------------------------------------------------------------
# cameo-bench train


def train(tmp_path, *extra, steps=2):
    from cameo_bench.__main__ import main

    bindings = [f"run_experiment.output_dir = '{tmp_path / 'runs'}'", f"train.steps = {steps}", "eval.every = 2",
                "train.checkpoint_every = 2", "eval.lpips = False"]
    argv = ["train", str(SMOKE), "--no-progress"]
    for binding in bindings:
        argv += ["--gin_param", binding]
    return main(argv + list(extra))


def only_run(uri, experiment="smoke"):
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    return runs[0]


def artifact_text(uri, run_id, path):
    return pathlib.Path(MlflowClient(uri).download_artifacts(run_id, path)).read_text()


def test_train_cli_logs_one_run_and_resume_continues_it(store, calls, tmp_path):
    assert train(tmp_path) == 0
    run = only_run(store)
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert {"train/loss_diffusion", "train/loss_cameo", "train/lr", "eval/psnr", "eval/ssim", "eval/pck_supervised",
            tracking.to_mlflow_key(keys.SUPERVISED_PCK1)} <= set(run.data.metrics)
    assert run.data.params["cameo.weight"] == "0.5" and run.data.params["backbone.name"] == "mv_dit"
    assert run.data.tags["cameo.layer_resolved"] != "none" and "cameo.layer_resolved" not in run.data.params
    assert run.data.tags["cameo.layer_resolved"] in run.data.tags["attn.layers"].split(",")
    tags = run.data.tags
    assert tags["variant"] == "cameo" and tags["device"] == "cpu" and tags["world_size"] == "1"
    layer = tags["cameo.layer_resolved"]  # a CLI run is named and tagged like a sweep trial
    assert run.info.run_name == f"mv_dit micro · CAMEO λ0.5 @{layer} · s0"
    assert (tags["layer"], tags["lambda"], tags["source"], tags["seed"], tags["backbone"]) == (
        layer, "0.5", "depth", "0", "mv_dit")
    assert pathlib.Path(tags["checkpoint.path"]).is_file()
    operative = artifact_text(store, run_id, "config/operative.gin")
    assert "train.steps = 2" in operative and "cameo.weight = 0.5" in operative
    assert "include 'gin/backbones/mv_dit_micro.gin'" not in operative
    assert "train.steps = 2" in artifact_text(store, run_id, "config/raw.gin")
    # one request per flush point (eval at step 2, checkpoint at step 2, finish), not per value
    assert 1 <= len(calls["metric_batches"]) <= 3

    assert train(tmp_path, "--resume", steps=4) == 0
    run = only_run(store)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert [s for s, _ in history(store, run_id, "train/loss_diffusion")] == [1, 2, 3, 4]
    assert [s for s, _ in history(store, run_id, "eval/psnr")] == [2, 4]


def test_a_single_view_run_tags_why_floors_and_attention_are_left_out(store, tmp_path):
    """A prior (no references) omits whole metric families by prefix (`eval/floor/`): the tags
    naming them must be keys MLflow accepts (a trailing slash is refused and failed every prior)."""
    assert train(tmp_path, "--gin_param", "data.num_views = 1", "--gin_param", "data.num_ref = 0",
                 "--gin_param", "cameo.weight = 0.0") == 0
    run = only_run(store)
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    for family in (keys.FLOOR, keys.ORACLE, keys.PSNR):
        assert "reference" in tags[keys.not_computed(family)]
    assert keys.not_computed(keys.FLOOR) == "not_computed.eval/floor"
    assert not any(k.startswith((keys.FLOOR, keys.ORACLE, keys.PSNR)) for k in run.data.metrics)


def test_train_cli_marks_a_nan_run_failed_and_keeps_its_metrics(store, tmp_path, monkeypatch):
    from cameo_bench.objectives.diffusion import MultiViewDiffusion

    original = MultiViewDiffusion.training_loss
    count = {"n": 0}

    def poisoned(self, *args, **kwargs):
        loss, aux = original(self, *args, **kwargs)
        count["n"] += 1
        # call 1 is the FLOP count at step 0 (engine/compute.py), call 2 step 0, call 3 step 1
        return (loss * float("nan") if count["n"] == 3 else loss), aux

    monkeypatch.setattr(MultiViewDiffusion, "training_loss", poisoned)
    assert train(tmp_path, "--gin_param", "eval.every = 0") == 3
    run = only_run(store)
    assert run.info.status == "FAILED"
    assert "NonFiniteLossError" in run.data.tags["error"] and "step 1" in run.data.tags["error"]
    assert history(store, run.info.run_id, "train/loss_diffusion")[0][0] == 1  # step 1 was not lost
    assert "train.steps = 2" in artifact_text(store, run.info.run_id, "config/operative.gin")


def test_train_cli_marks_an_error_inside_fit_failed_with_its_traceback(store, tmp_path, monkeypatch):
    from cameo_bench.engine import loop

    def explode(run, batches=None, **kwargs):
        raise RuntimeError("evaluation exploded")

    monkeypatch.setattr(loop, "evaluate_run", explode)
    with pytest.raises(RuntimeError, match="evaluation exploded"):
        train(tmp_path)
    run = only_run(store)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "RuntimeError: evaluation exploded"
    assert [s for s, _ in history(store, run.info.run_id, "train/loss_diffusion")] == [1, 2]
    assert "in explode" in artifact_text(store, run.info.run_id, "error.txt")


def test_train_cli_sigterm_flushes_and_marks_the_run_killed(store, tmp_path, monkeypatch):
    import signal
    import time

    from cameo_bench.engine import loop

    def terminated(run, batches=None, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # what Slurm sends at the time limit
        time.sleep(5)  # the handler interrupts this
        raise AssertionError("SIGTERM was not turned into an interrupt")

    monkeypatch.setattr(loop, "evaluate_run", terminated)
    assert train(tmp_path) == 143
    run = only_run(store)
    assert run.info.status == "KILLED" and run.data.tags["error"].startswith("Terminated")
    assert [s for s, _ in history(store, run.info.run_id, "train/loss_diffusion")] == [1, 2]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the CLI put the default back


def test_train_cli_config_errors_and_no_tracking(store, tmp_path):
    assert train(tmp_path, "--gin_param", "cameo.layer = 'blocks.99.attn'", "--experiment", "bad") == 2
    run = only_run(store, "bad")
    assert run.info.status == "FAILED" and "blocks.99.attn" in run.data.tags["error"]
    assert train(tmp_path, "--gin_param", "cameo.layer = 'blocks.99.attn'", "--no-tracking",
                 "--experiment", "off") == 2
    assert MlflowClient(store).get_experiment_by_name("off") is None


def _has_figure_hook():
    from cameo_bench.engine import loop

    return hasattr(loop, "log_figures")


@pytest.mark.skipif(not _has_figure_hook(), reason="the eval-figure hook of cameo_bench/engine/loop.py is not applied")
def test_eval_figures_become_run_artifacts(store, tmp_path):
    assert train(tmp_path, "--gin_param", "eval.attention = False") == 0
    run = only_run(store)
    listed = [f.path for f in MlflowClient(store).list_artifacts(run.info.run_id, "figures/step_0000002")]
    assert listed == ["figures/step_0000002/attention.png", "figures/step_0000002/samples.png"]


# ---------------------------------------------------------------------------------------------
# figures


def _panel_centre(fig, ax):
    box = ax.get_window_extent()
    height = fig.canvas.get_width_height()[1]
    return int(round((box.x0 + box.x1) / 2)), int(round(height - (box.y0 + box.y1) / 2))


def test_sample_grid_puts_ground_truth_above_generated(tmp_path):
    B, V, H, W = 2, 3, 8, 8
    colours = torch.rand(2, B, V, 3)  # [gt/generated, B, V, rgb]
    gt = colours[0, :, :, :, None, None].expand(B, V, 3, H, W)
    generated = colours[1, :, :, :, None, None].expand(B, V, 3, H, W)
    fig = artifacts.sample_grid(generated, gt, num_ref=1)
    path = artifacts.save_figure(fig, tmp_path / "samples.png")
    pixels = imread(path)[..., :3]
    axes = fig.axes
    assert len(axes) == 2 * B * V
    for b in range(B):
        for v in range(V):
            for row, which in ((2 * b, 0), (2 * b + 1, 1)):
                x, y = _panel_centre(fig, axes[row * V + v])
                assert torch.allclose(torch.from_numpy(pixels[y, x]).float(), colours[which, b, v], atol=2 / 255)
    with pytest.raises(ValueError, match=r"\[B, V, 3, H, W\]"):
        artifacts.sample_grid(generated[0], gt[0], num_ref=1)


def test_key_view_attention_matches_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    heads, Q, d, grid = 3, 4, 5, (3, 2, 3)
    q, k = torch.randn(heads, Q, d, generator=g), torch.randn(heads, 18, d, generator=g)
    out = artifacts.key_view_attention(q, k, 0.7, grid)
    assert out.shape == (Q, 3, 2, 3)
    for i in range(Q):
        for v in range(3):
            logits = [sum(float(q[h, i] @ k[h, v * 6 + n]) * 0.7 for h in range(heads)) / heads for n in range(6)]
            expected = torch.tensor(logits).exp() / torch.tensor(logits).exp().sum()
            assert torch.allclose(out[i, v].flatten(), expected, atol=1e-5)


def test_attention_figure_draws_truth_and_peak_where_they_are(tmp_path):
    V, H, W, stride = 3, 16, 16, 4
    images = torch.zeros(V, 3, H, W)
    attention = torch.zeros(V, H // stride, W // stride)
    attention[2, 1, 3] = 1.0  # the peak: token (x=3, y=1) of view 2 covers pixels x 12..15, y 4..7
    gt = torch.tensor([[math.nan, math.nan], [math.nan, math.nan], [5.0, 10.0]])
    fig = artifacts.attention_figure(images, 0, (8.0, 8.0), attention, gt_xy=gt)
    path = artifacts.save_figure(fig, tmp_path / "attention.png")
    pixels = torch.from_numpy(imread(path)[..., :3].copy())
    ax = fig.axes[2]  # query view 0, then key views 1 and 2
    box = ax.get_window_extent()
    height = fig.canvas.get_width_height()[1]

    def to_pixel(x, y):  # image pixel coordinates (centre of (0, 0) at 0) -> figure pixels
        return (box.x0 + (x + 0.5) / W * box.width, height - box.y1 + (y + 0.5) / H * box.height)

    inside = torch.zeros(pixels.shape[:2], dtype=torch.bool)
    inside[int(height - box.y1) + 1:int(height - box.y0) - 1, int(box.x0) + 1:int(box.x1) - 1] = True
    lime = inside & (pixels[..., 1] > 0.9) & (pixels[..., 0] < 0.2) & (pixels[..., 2] < 0.2)
    ys, xs = torch.nonzero(lime, as_tuple=True)
    assert len(xs) > 3, "no ground-truth marker drawn"
    ex, ey = to_pixel(5.0, 10.0)
    assert abs(xs.float().mean() - ex) < 1.5 and abs(ys.float().mean() - ey) < 1.5
    hot = inside & (pixels[..., 0] > 0.4) & ~lime
    ys, xs = torch.nonzero(hot, as_tuple=True)
    hx, hy = to_pixel(13.5, 5.5)  # centre of the peak token's 4 x 4 pixels
    assert abs(xs.float().mean() - hx) < 1.5 and abs(ys.float().mean() - hy) < 1.5
    assert int(hot.sum()) == pytest.approx((box.width / W * stride) * (box.height / H * stride), rel=0.3)
    with pytest.raises(ValueError, match="gt_xy"):
        artifacts.attention_figure(images, 0, (8.0, 8.0), attention, gt_xy=gt[:2])


def test_eval_figures_from_a_real_model(tmp_path):
    from cameo_bench import config
    from cameo_bench.engine.build import build_run

    exp = config.parse([SMOKE], [f"run_experiment.output_dir = '{tmp_path}'", "train.progress = False"])
    run = build_run(exp)
    batch = next(run.eval_batches())
    paths = artifacts.eval_figures(run.model, run.diffusion, batch, tmp_path / "figures",
                                   layer=run.layer, sampler_steps=2, seed=0)
    assert [p.name for p in paths] == ["samples.png", "attention.png"]
    for path in paths:
        assert imread(path).ndim == 3
    assert run.model.training  # left as it was


# ---------------------------------------------------------------------------------------------
# make ui


def test_ui_without_the_server_package_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setattr(tracking_ui, "server_available", lambda: False)
    assert tracking_ui.main([]) == 1
    assert ".[ui]" in capsys.readouterr().err


def test_ui_serves_on_loopback_at_a_free_port(store, monkeypatch, capsys):
    """The real server takes ~30 s to start: a stand-in answers /health once and exits."""
    stand_in = textwrap.dedent("""
        import http.server, sys
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200 if self.path == "/health" else 404); self.end_headers()
            def log_message(self, *a): pass
        server = http.server.HTTPServer((sys.argv[1], int(sys.argv[2])), H)
        server.handle_request()
    """)
    seen, real_command = {}, tracking_ui.server_command

    def command(uri, port):
        seen["uri"], seen["real"] = uri, real_command(uri, port)
        return [sys.executable, "-c", stand_in, tracking_ui.HOST, str(port)]

    monkeypatch.setattr(tracking_ui, "server_available", lambda: True)
    monkeypatch.setattr(tracking_ui, "server_command", command)
    assert tracking_ui.main(["--timeout", "30"]) == 0
    out = capsys.readouterr().out
    assert "ready: http://127.0.0.1:" in out
    port = int(out.split("ready: http://127.0.0.1:")[1].split()[0])
    assert seen["uri"] == store
    real = seen["real"]
    assert real[real.index("--host") + 1] == "127.0.0.1" and real[real.index("--port") + 1] == str(port)
    assert real[real.index("--backend-store-uri") + 1] == store
    assert json.dumps(real)  # plain strings only


def _has_gin_tracking_section():
    from cameo_bench import config
    return "tracking" in config.SECTIONS


@pytest.mark.skipif(not _has_gin_tracking_section(), reason="the gin `tracking` section of spec/config is not applied")
def test_gin_tracking_section(store, tmp_path):
    bad_layer = ["--gin_param", "cameo.layer = 'blocks.99.attn'"]  # fails before training: cheap
    assert train(tmp_path, *bad_layer, "--gin_param", "tracking.enabled = False", "--experiment", "gin-off") == 2
    assert MlflowClient(store).get_experiment_by_name("gin-off") is None
    assert train(tmp_path, *bad_layer, "--gin_param", "tracking.experiment = 'from-gin'") == 2
    assert only_run(store, "from-gin").info.status == "FAILED"
    assert train(tmp_path, *bad_layer, "--gin_param", "tracking.enabled = False", "--tracking",
                 "--experiment", "flag-wins") == 2
    assert only_run(store, "flag-wins").info.status == "FAILED"


@pytest.mark.slow
def test_processes_started_together_on_a_fresh_store_all_get_it(tmp_path):
    """Without the folder lock 3 of 4 processes failed in MLflow's schema migration, every time."""
    import multiprocessing

    from store_race import create_store  # a light module: each spawned process imports it, not this one

    ctx = multiprocessing.get_context("spawn")
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    barrier, results = ctx.Barrier(4), ctx.Queue()
    processes = [ctx.Process(target=create_store, args=(uri, barrier, results)) for _ in range(4)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(120)
    assert [results.get(timeout=5) for _ in processes] == ["ok"] * 4
    assert sorted(os.listdir(tmp_path / "new")) == ["mlflow.db"]  # no lock file is left behind
