"""Sweeps: grid expansion with baseline collapsing, stable trial ids, dry-run, and real sweeps on
the spawn pool and on submitit's local backend, with one trial made to fail."""
import argparse
import hashlib
import pathlib
import textwrap

import pytest

from cameo_bench import sweep, tracking
from cameo_bench.cli import sweep as sweep_cli

REPO = pathlib.Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "gin" / "experiments" / "smoke.gin")
FAST = ["eval.every = 0", "train.steps = 2", "train.checkpoint_every = 1"]
BAD_LAYER = "blocks.99.attn"  # the micro DiT has blocks.00.attn and blocks.01.attn


def make_spec(axes, fixed=(), **kw):
    return sweep.SweepSpec(name=kw.pop("name", "t"), base=[SMOKE], axes=axes, fixed=list(fixed), **kw)


def as_set(trials):
    return {(t.baseline, frozenset(t.bindings.items())) for t in trials}


def point(baseline, **bindings):
    return baseline, frozenset((k.replace("__", "."), v) for k, v in bindings.items())


def cli(argv):
    parser = argparse.ArgumentParser()
    sweep_cli.add_arguments(parser)
    return sweep_cli.run(parser.parse_args([str(a) for a in argv]))


def write_sweep(folder, name, axes, fixed=FAST, extra=""):
    path = pathlib.Path(folder) / f"{name}.gin"
    path.write_text(textwrap.dedent(f"""\
        # test sweep {name}
        sweep.name = '{name}'
        sweep.base = [{SMOKE!r}]
        sweep.fixed = {list(fixed)!r}
        sweep.axes = {axes!r}
        sweep.output_dir = {str(pathlib.Path(folder) / 'runs')!r}
        """) + extra)
    return path


# ---------------------------------------------------------------------------------------------
# expansion (no training)


def test_grid_is_the_cartesian_product_with_lambda_zero_collapsed_per_seed():
    spec = make_spec({"cameo.weight": [0.0, 0.1], "cameo.layer": ["a", "b"], "run_experiment.seed": [0, 1]},
                     fixed=["train.steps = 3"])
    trials = sweep.expand(spec, {"weight": 0.5, "source": "depth"})
    expected = {
        point(True, train__steps="3", run_experiment__seed="0", cameo__weight="0.0"),
        point(True, train__steps="3", run_experiment__seed="1", cameo__weight="0.0"),
    } | {
        point(False, train__steps="3", cameo__weight="0.1", cameo__layer=repr(layer), run_experiment__seed=str(seed))
        for layer in "ab" for seed in (0, 1)
    }
    assert len(trials) == 6 and as_set(trials) == expected


def test_source_none_and_int_zero_weight_collapse_into_the_same_baseline():
    spec = make_spec({"cameo.source": ["depth", "none"], "cameo.weight": [0, 0.2], "backbone.preset": ["micro", "tiny"]})
    trials = sweep.expand(spec, {"weight": 0.5, "source": "depth"})
    expected = {point(True, backbone__preset=repr(p), cameo__weight="0.0") for p in ("micro", "tiny")}
    expected |= {point(False, cameo__source="'depth'", cameo__weight="0.2", backbone__preset=repr(p))
                 for p in ("micro", "tiny")}
    assert as_set(trials) == expected


def test_named_axis_varies_bindings_together_and_axes_override_fixed():
    spec = make_spec({"source": [{"cameo.source": "noisy_depth", "cameo.source_options": {"noise": 0.1}},
                                 {"cameo.source": "shuffled"}, {"cameo.source": "none", "data.seed": 3}]},
                     fixed=["cameo.source = 'depth'", "train.steps = 5"])
    expected = {
        point(False, cameo__source="'noisy_depth'", cameo__source_options="{'noise': 0.1}", train__steps="5"),
        point(False, cameo__source="'shuffled'", train__steps="5"),
        # the baseline drops the cameo.* values of its point (and the fixed one they override) but keeps data.seed
        point(True, data__seed="3", cameo__weight="0.0", train__steps="5", cameo__source="'depth'"),
    }
    assert as_set(sweep.expand(spec, {"weight": 0.5})) == expected


def test_a_lambda_zero_base_makes_every_layer_point_one_baseline():
    spec = make_spec({"cameo.layer": ["a", "b", "c"], "run_experiment.seed": [0, 1]})
    trials = sweep.expand(spec, {"weight": 0.0, "source": "depth"})
    assert as_set(trials) == {point(True, run_experiment__seed=s, cameo__weight="0.0") for s in ("0", "1")}


@pytest.mark.parametrize("weight, source", [(0.0, "depth"), (0, "none"), (0.3, "none"), (0.3, "depth")])
def test_grid_and_spec_share_the_baseline_rule(weight, source):
    from cameo_bench.config.spec import CameoSpec

    [trial] = sweep.expand(make_spec({"cameo.weight": [weight], "cameo.source": [source]}), {})
    assert trial.baseline is (not CameoSpec(weight=weight, source=source).enabled)


def test_planning_a_sweep_loads_neither_torch_nor_mlflow():
    """grid, results and runner import the executors and tracking only when a sweep runs."""
    import subprocess
    import sys

    code = ("import sys, cameo_bench.sweep.grid, cameo_bench.sweep.results, cameo_bench.sweep.runner; "
            "print(sorted(m for m in ('torch', 'mlflow', 'cameo_bench.sweep.executors') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out


def test_trial_ids_hash_the_sorted_bindings_and_ignore_axis_order():
    a = sweep.expand(make_spec({"cameo.weight": [0.0, 0.5], "run_experiment.seed": [0]}, ["train.steps = 3"]), {})
    b = sweep.expand(make_spec({"run_experiment.seed": [0], "cameo.weight": [0.5, 0.0]}, ["train.steps=3"]), {})
    by_weight = {t.bindings["cameo.weight"]: t.id for t in a}
    lines = "cameo.weight = 0.5\nrun_experiment.seed = 0\ntrain.steps = 3"
    assert by_weight["0.5"] == hashlib.sha1(lines.encode()).hexdigest()[:12]
    assert {t.id for t in a} == {t.id for t in b} and len({t.id for t in a}) == 2
    c = sweep.expand(make_spec({"cameo.weight": [0.5], "run_experiment.seed": [0]}, ["train.steps = 4"]), {})
    assert c[0].id != by_weight["0.5"]


def test_dry_run_lists_ids_bindings_and_count(tmp_path, capsys):
    path = write_sweep(tmp_path, "dry", {"cameo.weight": [0.0, 0.5], "cameo.layer": ["blocks.00.attn", "blocks.01.attn"]})
    assert cli([path, "--dry-run"]) == 0
    out = capsys.readouterr().out
    trials = sweep.plan(sweep.load(path)).trials
    assert len(trials) == 3 and "3 trials (1 baseline, 2 CAMEO)" in out
    for trial in trials:
        line = next(line for line in out.splitlines() if line.startswith(trial.id))
        assert ("baseline" in line) == trial.baseline
        if not trial.baseline:
            assert trial.bindings["cameo.layer"] in line and "cameo.weight = 0.5" in line
    assert not (tmp_path / "runs").exists()  # nothing ran


def test_sweep_file_errors_name_file_line_and_key(tmp_path, capsys):
    path = write_sweep(tmp_path, "bad", {"cameo.weight": [0.5]}, extra="train.steps = 3\n")
    assert cli([path, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "line 7" in err and "sweep.fixed" in err
    typo = write_sweep(tmp_path, "typo", {"cameo.wieght": [0.5]})
    with pytest.raises(sweep.SweepError, match="wieght"):
        sweep.plan(sweep.load(typo))
    named = write_sweep(tmp_path, "named", {"variant": ["mlp"]})
    with pytest.raises(sweep.SweepError, match="named axis"):
        sweep.load(named)


@pytest.mark.parametrize("path", sorted(REPO.glob("gin/sweeps/*.gin")), ids=lambda p: p.name)
def test_shipped_sweeps_expand_and_every_trial_parses(path):
    text = path.read_text()
    assert "Command:" in text and "Expected runtime:" in text
    p = sweep.plan(sweep.load(path))  # parses every trial's gin config
    baselines = [t for t in p.trials if t.baseline]
    assert baselines and len(baselines) < len(p.trials)
    assert all(t.bindings["cameo.weight"] == "0.0" and not any(k.startswith("cameo.") and k != "cameo.weight"
                                                                for k in t.varied) for t in baselines)


def test_lambda_sweep_is_log_spaced_around_the_quickstart_weight_and_gives_each_variant_two_weights():
    spec = sweep.load(REPO / "gin" / "sweeps" / "lambda.gin")
    plain = [v for v in spec.axes["variant"] if set(v) == {"cameo.weight"}]  # the loss variants change more
    weights = sorted(v["cameo.weight"] for v in plain if v["cameo.weight"] > 0)
    assert weights[0] < 0.05 < weights[-1] and 0.05 in weights and len(weights) >= 4  # brackets the default
    ratios = [b / a for a, b in zip(weights, weights[1:])]
    assert max(ratios) / min(ratios) < 1.1  # evenly spaced in log (sqrt(10) steps, rounded)
    variants: dict[tuple, set] = {}
    for v in spec.axes["variant"]:
        if set(v) != {"cameo.weight"}:
            variants.setdefault(tuple(sorted((k, x) for k, x in v.items() if k != "cameo.weight")), set()).add(v["cameo.weight"])
    assert variants and all(len(w) >= 2 for w in variants.values())  # compared at their own best weight
    assert list(spec.axes)[0] == "run_experiment.seed"  # seed-major: a partial run covers every arm


# ---------------------------------------------------------------------------------------------
# tracking and running


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the module: creating the schema is the slow part."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    return tracking.ensure_store(uri)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch, store):
    monkeypatch.chdir(tmp_path)  # MLflow artifacts land under ./mlruns
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    return tmp_path


def test_a_trial_whose_worker_died_is_recorded_as_failed(in_tmp, store):
    from cameo_bench.sweep.executors import ensure_failed_in_store

    payload = {"tracking_uri": store, "experiment": "died", "sweep": "died", "trial": "abc", "label": "x",
               "baseline": False, "parent_run_id": None}
    result = sweep.TrialResult("abc", "FAILED", "worker died: BrokenProcessPool")
    ensure_failed_in_store(result, payload)
    runs = tracking.find_runs("died", {"sweep.trial": "abc"}, store)
    assert len(runs) == 1 and runs[0]["status"] == "FAILED" and "BrokenProcessPool" in runs[0]["tags"]["error"]
    ensure_failed_in_store(result, payload)  # idempotent: no second run
    assert len(tracking.find_runs("died", {"sweep.trial": "abc"}, store)) == 1


def _children(name, store):
    return {r["tags"]["sweep.trial"]: r for r in tracking.find_runs(name, {"sweep.name": name}, store)
            if "sweep.trial" in r["tags"]}


@pytest.mark.slow
def test_local_pool_sweep_with_a_failing_trial_then_resume(in_tmp, store, capsys):
    import mlflow

    path = write_sweep(in_tmp, "pool", {"cameo.weight": [0.0, 0.5], "cameo.layer": ["blocks.00.attn", BAD_LAYER]})
    trials = {t.id: t for t in sweep.plan(sweep.load(path)).trials}
    bad = next(t.id for t in trials.values() if t.bindings.get("cameo.layer") == repr(BAD_LAYER))
    assert len(trials) == 3

    assert cli([path, "--workers", 2]) == 1
    captured = capsys.readouterr()
    assert "1 trial(s) FAILED" in captured.err and bad in captured.err and BAD_LAYER in captured.err, captured
    runs = _children("pool", store)
    assert set(runs) == set(trials)
    statuses = {k: r["status"] for k, r in runs.items()}
    assert statuses == {k: "FAILED" if k == bad else "FINISHED" for k in trials}, captured.err
    assert "UnknownLayerError" in runs[bad]["tags"]["error"] and BAD_LAYER in runs[bad]["tags"]["error"]
    assert {k: r["tags"]["variant"] for k, r in runs.items()} == {
        k: "baseline" if t.baseline else "cameo" for k, t in trials.items()}
    parent = tracking.find_runs("pool", {"sweep.role": "parent"}, store)
    assert len(parent) == 1 and parent[0]["status"] == "FAILED"
    assert all(r["tags"]["mlflow.parentRunId"] == parent[0]["run_id"] for r in runs.values())
    client = mlflow.tracking.MlflowClient(store)
    good = next(k for k in trials if k != bad)
    history = client.get_metric_history(runs[good]["run_id"], "train/loss_diffusion")
    assert sorted(m.step for m in history) == [1, 2]
    assert (in_tmp / "runs" / "pool" / good / "checkpoints" / "latest.pt").exists()
    # The workers ran a copy of the code taken at the sweep's start, tagged with the commit of that moment.
    [copy] = (in_tmp / "runs" / "pool" / "code").iterdir()
    assert (copy / "cameo_bench" / "sweep" / "executors.py").exists()
    assert {r["tags"]["sweep.code"] for r in runs.values()} == {str(copy.resolve())}
    assert {r["tags"]["git.sha"] for r in runs.values()} == {tracking.git_tags()["git.sha"]}

    # Starting the sweep again skips the finished trials and restarts only the failed one, in its own run.
    assert cli([path, "--workers", 0]) == 1
    out = capsys.readouterr().out
    assert "2 already finished, 1 to run" in out and f"[1/1] {bad} FAILED" in out
    again = _children("pool", store)
    assert {k: r["run_id"] for k, r in again.items()} == {k: r["run_id"] for k, r in runs.items()}
    assert again[bad]["status"] == "FAILED" and len(tracking.find_runs("pool", {}, store)) == 4


@pytest.mark.slow
def test_submitit_local_backend_runs_a_trial(in_tmp, store):
    spec = make_spec({"cameo.weight": [0.0]}, fixed=["eval.every = 0", "train.steps = 1"], name="submitit_local",
                     output_dir=str(in_tmp / "runs"), executor="slurm",
                     slurm={"cluster": "local", "timeout_min": 10, "poll_seconds": 0.5})
    p = sweep.plan(spec)
    results = sweep.run(p, uri=store, echo=lambda *_: None)
    assert [(r.status, r.error) for r in results] == [("FINISHED", None)]
    runs = _children("submitit_local", store)
    assert [r["status"] for r in runs.values()] == ["FINISHED"] and runs[p.trials[0].id]["tags"]["variant"] == "baseline"
    assert list((in_tmp / "runs" / "submitit_local" / "submitit").glob("*_log.out"))  # it went through submitit


@pytest.mark.slow
def test_sigterm_to_the_sweep_stops_its_workers_and_marks_every_trial_killed(in_tmp, store):
    """`kill <sweep pid>` (what a scheduler or a user sends) must not leave the workers training on as
    orphans: the parent passes SIGTERM on, each running trial ends KILLED with its checkpoint."""
    import os
    import signal
    import subprocess
    import sys
    import time

    # more trials than workers: a worker whose trial was stopped must not start the one queued to it
    path = write_sweep(in_tmp, "sigterm", {"run_experiment.seed": [0, 1, 2, 3, 4]},
                       fixed=["eval.every = 0", "train.steps = 100000", "train.checkpoint_every = 2"])
    trials = [t.id for t in sweep.plan(sweep.load(path)).trials][:2]  # the two that start first
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "OMP_NUM_THREADS": "1"}
    log = (in_tmp / "sweep.log").open("w")  # a file, not a pipe: nobody reads a pipe until the end
    parent = subprocess.Popen([sys.executable, "-m", "cameo_bench", "sweep", str(path), "--workers", "2"],
                              cwd=in_tmp, env=env, start_new_session=True,  # its own group: workers included
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        checkpoints = [in_tmp / "runs" / "sigterm" / t / "checkpoints" / "latest.pt" for t in trials]
        deadline = time.monotonic() + 120
        while not all(c.exists() for c in checkpoints):  # both workers are past their first steps
            assert parent.poll() is None and time.monotonic() < deadline, (in_tmp / "sweep.log").read_text()[-3000:]
            time.sleep(0.5)
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=120) == 143  # 128 + SIGTERM, after one line saying how to go on
        for _ in range(300):  # the workers exit with (or just after) the parent
            try:
                os.killpg(parent.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            left = [pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:200]
                    for pid in os.listdir("/proc") if pid.isdigit() and _group_of(pid) == parent.pid]
            os.killpg(parent.pid, signal.SIGKILL)
            raise AssertionError(f"processes outlived the SIGTERM'd sweep by 60 s: {left}")
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
        log.close()
    runs = _children("sigterm", store)
    assert {k: r["status"] for k, r in runs.items()} == {t: "KILLED" for t in trials}
    assert tracking.find_runs("sigterm", {"sweep.role": "parent"}, store)[0]["status"] == "KILLED"


def _group_of(pid: str) -> int | None:
    try:  # field 5 of /proc/PID/stat, after the parenthesised command name
        return int(pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, IndexError, ValueError):
        return None


def test_reuse_from_copies_a_finished_run_of_the_same_configuration_and_trains_the_rest(in_tmp, store, capsys):
    """Overlapping sweeps: the second names the first in `sweep.reuse_from`. Its trial ids differ
    (other bindings spell the same configuration), yet the two trials whose logged params match are
    copied, and the copy equals what training that configuration once more gives (a third sweep,
    no reuse): the premise that equal params mean equal training, and a complete copy."""
    import mlflow

    first = write_sweep(in_tmp, "first", {"cameo.weight": [0.0, 0.5]})
    assert cli([first, "--workers", 0]) == 0
    # the same two configurations (smoke.gin's selector is depth:0.5), spelled through a named axis,
    # plus one new weight
    axes = {"arm": [{"cameo.weight": 0.0}, {"cameo.weight": 0.5, "cameo.layer": "depth:0.5"}, {"cameo.weight": 0.25}]}
    second = write_sweep(in_tmp, "second", axes, extra="sweep.reuse_from = ['first', 'no_such_experiment']\n")
    again = write_sweep(in_tmp, "again", axes)
    capsys.readouterr()
    assert cli([second, "--workers", 0]) == 0
    assert capsys.readouterr().err.count("copied run") == 2
    assert cli([again, "--workers", 0]) == 0

    client = mlflow.tracking.MlflowClient(store)
    originals = {r["run_id"] for r in _children("first", store).values()}
    copies = {k: client.get_run(r["run_id"]) for k, r in _children("second", store).items()}
    trained = {k: client.get_run(r["run_id"]) for k, r in _children("again", store).items()}
    assert set(copies) == set(trained) and len(copies) == 3
    reused = {k for k, run in copies.items() if "reused_from" in run.data.tags}
    assert len(reused) == 2 and {copies[k].data.tags["reused_from"] for k in reused} == originals
    fresh = next(iter(set(copies) - reused))
    assert copies[fresh].data.params["cameo.weight"] == "0.25"
    for key in reused:
        copy, ref = copies[key], trained[key]
        assert copy.info.status == "FINISHED" and copy.data.tags["sweep.name"] == "second"
        assert copy.data.tags["reused_from.experiment"] == "first"
        assert copy.info.run_name == ref.info.run_name
        assert copy.data.params["output_dir"].endswith("second")
        assert {k: v for k, v in copy.data.params.items() if k not in ("name", "output_dir")} == {
            k: v for k, v in ref.data.params.items() if k not in ("name", "output_dir")}
        assert set(copy.data.metrics) == set(ref.data.metrics)
        for metric in ("train/loss_diffusion", "time/step_seconds"):
            history = [(m.step, m.value) for m in client.get_metric_history(copy.info.run_id, metric)]
            assert len(history) == 2
            if metric.startswith("train/"):
                assert history == [(m.step, m.value) for m in client.get_metric_history(ref.info.run_id, metric)]
        source = client.get_run(copy.data.tags["reused_from"])
        assert (copy.info.start_time, copy.info.end_time) == (source.info.start_time, source.info.end_time)
        assert {a.path for a in client.list_artifacts(copy.info.run_id)} == {
            a.path for a in client.list_artifacts(source.info.run_id)}


def test_reuse_matches_every_param_but_the_run_folders_name_and_place_and_not_runs_older_than_their_inputs(
        in_tmp, store):
    import mlflow

    from cameo_bench.tracking import run_copy

    experiment = tracking.get_or_create_experiment("params_only", store)
    client = mlflow.tracking.MlflowClient(store)
    run_id = client.create_run(experiment).info.run_id
    client.log_batch(run_id, params=[mlflow.entities.Param(k, v) for k, v in
                                     {"name": "a", "output_dir": "x", "train.steps": "2", "seed": "0",
                                      "train.progress": "True"}.items()])
    client.set_terminated(run_id, "FINISHED")
    same = {"name": "b", "output_dir": "y", "train.steps": "2", "seed": "0", "train.progress": "False"}
    assert run_copy.find_equivalent(["params_only"], same, store)["run_id"] == run_id
    started = client.get_run(run_id).info.start_time  # a file it read by path changed after it started:
    assert run_copy.find_equivalent(["params_only"], same, store, started_after_ms=started) is None
    assert run_copy.find_equivalent(["params_only"], same, store, started_after_ms=started - 1)["run_id"] == run_id
    assert run_copy.find_equivalent(["params_only"], {**same, "seed": "1"}, store) is None
    assert run_copy.find_equivalent(["params_only"], {**same, "train.lr": "1"}, store) is None  # one more param
    assert run_copy.find_equivalent(["params_only", "absent"], {k: v for k, v in same.items() if k != "seed"},
                                    store) is None
    # A knob added after the run: the run lacks its param and counts as having had its default.
    newer = {**same, "diffusion.min_snr_gamma": "0.0"}
    assert run_copy.find_equivalent(["params_only"], newer, store) is None
    assert run_copy.find_equivalent(["params_only"], newer, store,
                                    defaults={"diffusion.min_snr_gamma": "0.0", "unrelated": "1"})["run_id"] == run_id
    assert run_copy.find_equivalent(["params_only"], {**newer, "diffusion.min_snr_gamma": "5.0"}, store,
                                    defaults={"diffusion.min_snr_gamma": "0.0"}) is None
    assert run_copy.find_equivalent(["params_only"], {**same, "seed": "1"}, store, defaults={"seed": "1"}) is None


def test_reuse_dates_a_configuration_by_its_newest_input_file(tmp_path):
    import os

    from cameo_bench import config
    from cameo_bench.sweep.executors import _inputs_modified_ms

    prior = tmp_path / "prior" / "pretrained"
    prior.mkdir(parents=True)
    (prior / "config.json").write_text("{}")
    (prior / "weights.safetensors").write_bytes(b"0")
    os.utime(prior / "config.json", (1_000, 1_000))
    os.utime(prior / "weights.safetensors", (2_000.5, 2_000.5))
    assert _inputs_modified_ms(config.parse([SMOKE])) == 0
    assert _inputs_modified_ms(config.parse([SMOKE], [f"backbone.init_from = '{prior}'"])) == 2_000_500


def test_reuse_continues_a_shorter_run_of_the_same_configuration_to_what_training_from_scratch_gives(in_tmp, store,
                                                                                                     capsys):
    """A sweep that moved to more steps continues the finished shorter run from its last checkpoint
    instead of training from step 0; the record must equal a from-scratch run's, bit for bit
    (if a step-count-dependent schedule is ever added, this fails and continuing must be refused)."""
    import mlflow

    fixed = ["eval.every = 2", "eval.num_scenes = 2", "train.log_every = 1", "train.checkpoint_every = 2"]
    axes = {"cameo.weight": [0.5]}
    short = write_sweep(in_tmp, "short", axes, fixed=fixed + ["train.steps = 2"])
    assert cli([short, "--workers", 0]) == 0
    longer = write_sweep(in_tmp, "longer", axes, fixed=fixed + ["train.steps = 4"],
                         extra="sweep.reuse_from = ['short']\n")
    scratch = write_sweep(in_tmp, "scratch", axes, fixed=fixed + ["train.steps = 4"])
    # an odd step count is not continued (the short run never checkpointed or evaluated at step 3)
    odd = write_sweep(in_tmp, "odd", axes, fixed=["eval.every = 0", "train.log_every = 1", "train.checkpoint_every = 1",
                                                  "train.steps = 3"])
    capsys.readouterr()
    assert cli([longer, "--workers", 0]) == 0
    assert "continues run" in capsys.readouterr().err
    assert cli([scratch, "--workers", 0]) == 0
    client = mlflow.tracking.MlflowClient(store)
    (cont,), (ref,) = (
        [client.get_run(r["run_id"]) for r in _children(name, store).values()] for name in ("longer", "scratch"))
    assert cont.info.status == "FINISHED" and cont.data.tags["reused_from.experiment"] == "short"
    assert cont.data.params["train.steps"] == "4"
    for metric in ("train/loss_diffusion", "train/loss_cameo", "eval/psnr", "eval/heldout_loss"):
        got = [(m.step, m.value) for m in client.get_metric_history(cont.info.run_id, metric)]
        want = [(m.step, m.value) for m in client.get_metric_history(ref.info.run_id, metric)]
        assert sorted(set(got)) == sorted(set(want)) and {s for s, _ in want} >= {2, 4}, metric
    checkpoint_dir = in_tmp / "runs" / "longer" / cont.data.params["name"] / "checkpoints"
    assert (checkpoint_dir / "latest.pt").exists()
    capsys.readouterr()
    assert cli([odd.with_name("odd.gin"), "--workers", 0]) == 0  # no reuse_from at all: trains
    odd_reuse = write_sweep(in_tmp, "odd_reuse", axes, fixed=["eval.every = 0", "train.log_every = 1",
                                                              "train.checkpoint_every = 4", "train.steps = 8"],
                            extra="sweep.reuse_from = ['odd']\n")
    assert cli([odd_reuse, "--workers", 0]) == 0
    assert "continues run" not in capsys.readouterr().err  # 3 is no multiple of the longer run's checkpoint_every
