"""Convergence report: threshold crossings, AUC and bootstrap checked against hand computations and
curves with a known speed-up, then the whole report built from a real sqlite MLflow store."""
import argparse
import json
import math

import numpy as np
import pytest

from cameo_bench.report import align, build_report, compare, first_crossing, group_runs, normalised_auc
from cameo_bench.report.curves import crossing_steps, thresholds_between
from cameo_bench.report.runs import is_baseline, supervised_layer
from cameo_bench.tracking import RunRecord, from_mlflow_key, keys, load_runs, to_mlflow_key

LAYERS = ["blocks.00.attn", "blocks.01.attn", "blocks.02.attn", "blocks.03.attn"]
BINS = ["0-30", "30-60", "60-90", "90+"]
SUPERVISED = "blocks.02.attn"
TIME_SCALES = (1.0, 1.25, 0.8)  # per seed: seeds converge at different rates, CAMEO keeps each seed's rate


def psnr(s, c=1.0, plateau=5.0):
    return 10 + plateau * (1 - np.exp(-s / (400 * c)))


def synthetic_metrics(weight: float, seed: int, speed: float, every: int, plateau: float = 5.0, steps: int = 4000):
    """CAMEO at `speed` 2 is the baseline curve with the step doubled: iterations to any threshold halve.
    The baseline is evaluated every 200 steps and CAMEO every 100, so CAMEO's piecewise-linear curve
    is exactly the baseline's at twice the step, and the interpolated speed-up is exactly 2."""
    grid = np.arange(0, steps + 1, every)
    c = TIME_SCALES[seed % 3]
    m = {"eval/psnr": psnr(grid * speed, c, plateau),
         "eval/lpips_vgg": 0.6 - 0.4 * (1 - np.exp(-grid * speed / (400 * c)))}
    for j, layer in enumerate(LAYERS):
        top = 0.3 + 0.1 * j + (0.3 if weight > 0 and layer == SUPERVISED else 0.0)
        m[f"attn/{layer}/pck@1"] = top * (1 - np.exp(-grid / 500))
        for b, name in enumerate(BINS):
            m[f"attn/{layer}/pck@1/{name}"] = top * (1 - 0.2 * b) * (1 - np.exp(-grid / 500))
    if weight > 0:
        m["attn/supervised/pck@1"] = m[f"attn/{SUPERVISED}/pck@1"]
    return {k: [(int(a), float(b)) for a, b in zip(grid, v)] for k, v in m.items()}


def synthetic_params(weight: float, seed: int, trial: int) -> dict[str, str]:
    return {"backbone.name": "mv_dit", "backbone.preset": "micro", "cameo.weight": str(weight),
            "cameo.layer": "depth:0.5", "cameo.source": "depth", "cameo.head": "mean", "seed": str(seed),
            "data.azimuth_step_deg": "30.0", "name": f"trial{trial}", "train.steps": "4000"}


# arm name -> (cameo.weight, speed, evaluation every, plateau)
ARMS = {"baseline": (0.0, 1.0, 200, 5.0), "fast": (0.5, 2.0, 100, 5.0), "weak": (0.1, 1.0, 100, 4.0)}


def synthetic_sweep() -> list[RunRecord]:
    runs = []
    for seed in range(3):
        for weight, speed, every, plateau in ARMS.values():
            i = len(runs)
            runs.append(RunRecord(f"run{i:02d}", f"trial{i}", synthetic_params(weight, seed, i), {"git.sha": "abc123"},
                                  synthetic_metrics(weight, seed, speed, every, plateau)))
    return runs


# ---------------------------------------------------------------------------------------------
# pure functions against hand computations


def test_crossing_interpolates_linearly_between_evaluations():
    steps, values = [0, 100, 200, 300], [1.0, 2.0, 4.0, 5.0]
    assert first_crossing(steps, values, 3.0) == pytest.approx(150.0)  # halfway from 2 (at 100) to 4 (at 200)
    assert first_crossing(steps, values, 2.5) == pytest.approx(125.0)
    assert first_crossing(steps, values, 4.0) == pytest.approx(200.0)  # exactly at an evaluation
    assert first_crossing(steps, values, 0.5) == 0.0  # already past at the first evaluation
    assert first_crossing(steps, values, 6.0) is None  # never reached
    assert first_crossing(steps, [5.0, 4.0, 2.0, 1.0], 3.0, higher=False) == pytest.approx(150.0)
    assert first_crossing(steps, [1.0, 3.0, 2.0, 4.0], 2.5) == pytest.approx(75.0)  # the first crossing, not a later one


def test_crossing_is_vectorised_over_curves_and_thresholds():
    steps = np.array([0.0, 100.0, 200.0])
    values = np.array([[0.0, 1.0, 2.0], [0.0, 2.0, 4.0]])  # [2, 3]
    got = crossing_steps(steps, values[:, None, :], np.array([[0.5, 1.5], [3.0, 9.0]]))  # [2 curves, 2 thresholds]
    np.testing.assert_allclose(got, [[50.0, 150.0], [150.0, np.nan]])


def test_align_interpolates_onto_the_union_of_steps_within_the_common_range():
    steps, values = align([[(0, 0.0), (100, 1.0), (200, 2.0)], [(50, 10.0), (150, 20.0), (300, 50.0)]])
    np.testing.assert_array_equal(steps, [50, 100, 150, 200])
    np.testing.assert_allclose(values, [[0.5, 1.0, 1.5, 2.0], [10.0, 15.0, 20.0, 30.0]])
    with pytest.raises(ValueError, match="share no step range"):
        align([[(0, 1.0), (10, 1.0)], [(20, 1.0), (30, 1.0)]])


def test_normalised_auc_is_the_trapezoid_mean_level():
    assert normalised_auc([0, 100, 300], [0.0, 1.0, 1.0]) == pytest.approx((0.5 * 100 + 1.0 * 200) / 300)
    assert normalised_auc([7], [3.0]) == pytest.approx(3.0)


def test_threshold_at_fraction_one_is_exactly_the_final_value():
    first, last = np.array([0.1]), np.array([0.3])  # 0.1 + 1 * (0.3 - 0.1) != 0.3 in floating point
    tau = thresholds_between(first, last, [0.0, 0.5, 1.0])[0]
    assert tau[0] == 0.1 and tau[2] == 0.3 and tau[1] == pytest.approx(0.2)


def _arm(name: str, seeds=(0, 1, 2)):
    weight, speed, every, plateau = ARMS[name]
    return [synthetic_metrics(weight, s, speed, every, plateau)["eval/psnr"] for s in seeds]


def test_known_speedup_is_two_at_every_threshold_with_a_ci_containing_two():
    paired = compare(_arm("baseline"), _arm("fast"), metric="eval/psnr", base_seeds=[0, 1, 2], variant_seeds=[0, 1, 2],
                     n_boot=500, seed=0)
    assert paired.paired
    np.testing.assert_allclose(paired.speedup, 2.0, rtol=1e-9)
    np.testing.assert_allclose(paired.speedup_ci, 2.0, rtol=1e-9)  # paired seeds: every resample is exactly 2
    np.testing.assert_allclose(paired.variant_iters * 2, paired.base_iters, rtol=1e-9)
    assert paired.base_iters[-1] == 4000 and paired.variant_iters[-1] == pytest.approx(2000)
    # the seeds of the two arms differ: independent resampling, a real interval around 2
    unpaired = compare(_arm("baseline"), _arm("fast", seeds=(1, 2, 0)), metric="eval/psnr",
                       base_seeds=[0, 1, 2], variant_seeds=[3, 4, 5], n_boot=500, seed=0)
    assert not unpaired.paired
    np.testing.assert_allclose(unpaired.speedup, 2.0, rtol=1e-9)
    assert np.all(unpaired.speedup_ci[:, 0] < 2.0) and np.all(unpaired.speedup_ci[:, 1] > 2.0)


def test_auc_and_final_gap_match_the_analytic_curves():
    comp = compare(_arm("baseline"), _arm("fast"), metric="eval/psnr", n_boot=200)
    T, cs = 4000.0, np.array(TIME_SCALES)
    # mean over seeds of (1/T) * integral of 10 + 5 (1 - exp(-k s / 400c)) ds, k = 1 or 2
    exact = [float(np.mean(10 + 5 * (1 - 400 * cs / (k * T) * (1 - np.exp(-k * T / (400 * cs)))))) for k in (1, 2)]
    assert comp.auc[0] == pytest.approx(exact[0], abs=0.02)  # trapezoids on a 200-step grid
    assert comp.auc[1] == pytest.approx(exact[1], abs=0.02)
    assert comp.auc[1] > comp.auc[0]
    assert comp.auc_diff_ci[0] > 0  # CAMEO's curve is above the baseline's everywhere
    gap = float(np.mean(psnr(2 * T, cs) - psnr(T, cs)))
    assert comp.final_gap == pytest.approx(gap, rel=1e-9)
    lpips = lambda k: [synthetic_metrics(*ARMS[k][:1], s, *ARMS[k][1:])["eval/lpips_vgg"] for s in range(3)]  # noqa: E731
    lower = compare(lpips("baseline"), lpips("fast"), metric="eval/lpips_vgg", n_boot=200)
    assert not lower.higher and lower.auc[1] < lower.auc[0]
    np.testing.assert_allclose(lower.speedup, 2.0, rtol=1e-9)


def test_not_reached_is_reported_as_zero_speedup():
    comp = compare(_arm("baseline"), _arm("weak"), metric="eval/psnr", base_seeds=[0, 1, 2], variant_seeds=[0, 1, 2],
                   n_boot=300)
    # plateau 14 vs the baseline's ~15: thresholds at 90% (~14.5) and 100% are never reached
    assert np.isnan(comp.variant_iters[2:]).all() and (comp.speedup[2:] == 0).all()
    assert (comp.not_reached_share[2:] == 1).all() and (comp.speedup_ci[2:] == 0).all()
    assert (comp.speedup[:2] > 0).all()
    # the 50% threshold by hand: the weak arm's own curve crosses it by interpolation on its grid
    steps, values = align(_arm("weak"))
    t_weak = first_crossing(steps, values.mean(0), comp.thresholds[0])
    assert comp.variant_iters[0] == pytest.approx(t_weak)


def test_bootstrap_is_deterministic_given_its_seed():
    args = (_arm("baseline"), _arm("fast", seeds=(1, 2, 0)))
    kw = dict(metric="eval/psnr", base_seeds=[0, 1, 2], variant_seeds=[3, 4, 5], n_boot=300)
    a, b, c = compare(*args, seed=5, **kw), compare(*args, seed=5, **kw), compare(*args, seed=6, **kw)
    np.testing.assert_array_equal(a.speedup_ci, b.speedup_ci)
    assert a.final_gap_ci == b.final_gap_ci
    assert not np.array_equal(a.speedup_ci, c.speedup_ci)


def test_one_seed_gives_no_interval_and_a_flat_baseline_no_speedup():
    one = compare(_arm("baseline", seeds=(0,)), _arm("fast", seeds=(0,)), metric="eval/psnr")
    np.testing.assert_allclose(one.speedup, 2.0, rtol=1e-9)
    assert np.isnan(one.speedup_ci).all() and math.isnan(one.final_gap_ci[0])
    flat = compare([[(0, 5.0), (100, 5.0)]], [[(0, 5.0), (100, 6.0)]], metric="eval/psnr")
    assert np.isnan(flat.speedup).all()  # the baseline never improved: no threshold between its ends
    from cameo_bench.report.build import _speed_cell

    assert _speed_cell(flat, 0).startswith("— (the baseline does not improve")


# ---------------------------------------------------------------------------------------------
# runs -> variants and baselines


def _record(weight, seed, source="depth", **extra):
    params = {**synthetic_params(weight, seed, 0), "cameo.source": source, **extra}
    return RunRecord(f"r{weight}{source}{seed}{sorted(extra.items())}", "x", params, {}, {"eval/psnr": [(0, 1.0)]})


def test_variants_group_seeds_and_find_their_baseline():
    runs = [_record(0.0, s, layer_unused="a") for s in range(2)] + [_record(0.5, s) for s in range(2)]
    runs += [_record(0.2, 0, source="none")]  # source none is a baseline whatever its weight
    runs += [_record(0.5, s, **{"train.steps": "2000"}) for s in range(2)]  # shorter run: baseline by backbone + data
    grouping = group_runs(runs)
    bases = [v for v in grouping.variants if v.baseline_arm]
    cameo = [v for v in grouping.variants if not v.baseline_arm]
    assert all(is_baseline(r) for v in bases for r in v.runs) and len(cameo) == 2
    assert sorted(len(v.runs) for v in cameo) == [2, 2] and sorted(v.seeds for v in cameo)[0] == ["0", "1"]
    assert all(v.baseline is not None and v.baseline.baseline_arm for v in cameo)
    assert "train.steps" in grouping.varying and "cameo.weight" not in grouping.varying
    with pytest.raises(ValueError, match="cameo.weight"):
        is_baseline(RunRecord("bad", "bad", {"cameo.weight": "lots"}))


def test_supervised_layer_is_found_from_identical_histories():
    run = RunRecord("r", "r", synthetic_params(0.5, 0, 0), {}, synthetic_metrics(0.5, 0, 2.0, 100))
    assert supervised_layer(run) == SUPERVISED
    twin = dict(run.metrics)  # read under current names (`keys.attn`), though logged under the old ones
    twin[keys.attn("blocks.03.attn", keys.PCK1)] = twin[keys.attn(SUPERVISED, keys.PCK1)]  # two fit: do not guess
    assert supervised_layer(RunRecord("t", "t", run.params, {}, twin)) is None
    run.tags[keys.LAYER_RESOLVED] = "blocks.01.attn"
    assert supervised_layer(run) == "blocks.01.attn"


def test_supervised_layer_is_the_tag_else_the_param_of_runs_logged_before_the_redesign():
    run = RunRecord("r", "r", synthetic_params(0.5, 0, 0), {}, {})
    assert supervised_layer(run) is None  # nothing logged and no histories to match
    run.params[keys.LAYER_RESOLVED] = "blocks.01.attn"  # how the engine logged it before
    assert supervised_layer(run) == "blocks.01.attn"
    run.tags[keys.LAYER_RESOLVED] = "blocks.03.attn"  # how it logs it now
    assert supervised_layer(run) == "blocks.03.attn"
    # a baseline supervises nothing, whatever its selector resolves to (tag) or however it was logged
    base = RunRecord("b", "b", synthetic_params(0.0, 0, 0), {keys.LAYER_RESOLVED: "blocks.02.attn"}, {})
    assert supervised_layer(base) is None
    old_base = RunRecord("o", "o", {**synthetic_params(0.0, 0, 0), keys.LAYER_RESOLVED: "none"}, {}, {})
    assert supervised_layer(old_base) is None


def test_the_baseline_rule_is_the_specs():
    from cameo_bench.config.spec import is_baseline as rule

    for weight, source in (("0", "depth"), ("0.0", "depth"), ("0.5", "none"), ("0.5", "depth"), ("1e-3", "shuffled")):
        run = RunRecord("r", "r", {"cameo.weight": weight, "cameo.source": source})
        assert is_baseline(run) == rule(float(weight), source)
    assert is_baseline(RunRecord("r", "r", {"cameo.weight": "0.5", "cameo.source": "none"}))
    assert not is_baseline(RunRecord("r", "r", {"cameo.weight": "0.5", "cameo.source": "depth"}))


def test_report_from_records_writes_every_part(tmp_path):
    report = build_report(synthetic_sweep(), tmp_path / "r", experiment="synthetic", n_boot=200, draw=False,
                          command="cameo-bench report --experiment synthetic --bootstrap 200")
    fast, weak = report.comparison("weight=0.5", "eval/psnr"), report.comparison("weight=0.1", "eval/psnr")
    np.testing.assert_allclose(fast.speedup, 2.0, rtol=1e-9)
    assert fast.auc[1] > fast.auc[0] > weak.auc[1]
    pck = report.comparison("weight=0.5", "attn/supervised/pck@1")  # baseline read at the supervised layer
    assert pck.final_gap == pytest.approx(0.3 * (1 - math.exp(-4000 / 500)))
    md = (tmp_path / "r" / "report.md").read_text()
    assert md.splitlines()[2] == "Regenerate with `cameo-bench report --experiment synthetic --bootstrap 200`"
    assert "2.00× [2.00×, 2.00×]" in md and "n.r. [n.r., n.r.]" in md
    assert "| blocks.02.attn | 0.500 | **0.800** | **0.800** |" in md  # both CAMEO arms supervise blocks.02
    assert "| baseline | blocks.02.attn | 0.500 ± 0.000 | 0.400 ± 0.000 | 0.300 ± 0.000 | 0.200 ± 0.000 |" in md
    assert not list((tmp_path / "r").glob("*.png"))


def test_labels_leave_out_what_only_differs_between_backbones():
    runs = []
    for name, steps in (("mv_dit", "300"), ("mv_unet", "200")):
        for weight in (0.0, 0.5):
            for seed in range(2):
                runs.append(_record(weight, seed, **{"backbone.name": name, "train.steps": steps}))
    grouping = group_runs(runs)
    assert sorted(v.label for v in grouping.variants) == ["baseline", "baseline", "cameo", "cameo"]
    assert "train.steps" in grouping.varying and grouping.varying_by_backbone["mv_dit/micro"] == []
    assert all(v.baseline is not None and v.baseline.backbone == v.backbone for v in grouping.variants if not v.baseline_arm)


@pytest.mark.parametrize("logged_as", ["param", "tag"])  # a param before the redesign, a tag now
def test_a_resolved_layer_equal_to_the_layer_name_is_not_repeated_in_labels(logged_as):
    def record(layer, resolved):
        run = _record(0.5, 0, **{"cameo.layer": layer})
        (run.params if logged_as == "param" else run.tags)[keys.LAYER_RESOLVED] = resolved
        return run

    base = _record(0.0, 0)
    if logged_as == "tag":
        base.tags[keys.LAYER_RESOLVED] = "a.0"  # a baseline's selector resolves too: no label, no variant of its own
    runs = [base] + [record(n, n) for n in ("a.0", "a.1")]
    labels = sorted(v.label for v in group_runs(runs).variants)
    assert labels == ["baseline", "layer=a.0", "layer=a.1"]
    runs.append(record("depth:0.5", "a.1"))  # a selector: keep both
    grouping = group_runs(runs)
    assert "layer=depth:0.5, layer_resolved=a.1" in {v.label for v in grouping.variants}
    assert {v.label: v.layer for v in grouping.variants}["layer=depth:0.5, layer_resolved=a.1"] == "a.1"


def test_compute_line_counts_side_by_side_runs_once():
    from cameo_bench.report.build import _compute_line
    runs = [RunRecord("a", "a", start_time=1000.0, end_time=1600.0), RunRecord("b", "b", start_time=1300.0, end_time=1900.0),
            RunRecord("c", "c")]  # no times: left out
    line = _compute_line(runs)
    assert "2 runs, 10.0 min median per run (start to end)" in line and "20 run-minutes" in line
    assert "15 min from the first" in line
    # with the training clock logged it counts, not the span (which includes a resumed run's pause)
    runs = [RunRecord("a", "a", metrics={"time/train_seconds": [(1, 60.0), (2, 240.0)]}, start_time=1000.0,
                      end_time=5000.0),
            RunRecord("b", "b", metrics={"time/train_seconds": [(2, 480.0)]}, start_time=1300.0, end_time=1900.0)]
    line = _compute_line(runs)
    assert "2 runs, 6.0 min of training (the training clock) median per run (range 4.0-8.0)" in line, line
    assert "12 run-minutes" in line and "67 min from the first" in line


def test_quality_by_viewpoint_bin_table_and_paired_gap(tmp_path):
    """Baseline PSNR 10 + seed in 0-30 and 8 + seed in 60-90; CAMEO +0.5 and +2 dB: the gap rows are
    exactly those, whatever the seed offsets (pairing by seed)."""
    runs = []
    for seed in range(3):
        for weight, bonus in ((0.0, (0.0, 0.0)), (0.5, (0.5, 2.0))):
            m = {"eval/psnr": [(0, 5.0), (100, 9.0 + seed)],
                 "eval/psnr/0-30": [(0, 5.0), (100, 10.0 + seed + bonus[0])],
                 "eval/psnr/60-90": [(0, 5.0), (100, 8.0 + seed + bonus[1])]}
            runs.append(RunRecord(f"r{weight}{seed}", "x", synthetic_params(weight, seed, len(runs)), {}, m))
    build_report(runs, tmp_path / "q", experiment="q", n_boot=50, draw=False)
    md = (tmp_path / "q" / "report.md").read_text()
    assert "| arm | 0-30 | 60-90 |" in md
    assert "| baseline | 11.000 ± 1.000 | 9.000 ± 1.000 |" in md
    assert "| Δ cameo − baseline | +0.500 | +2.000 |" in md


# ---------------------------------------------------------------------------------------------
# end to end through a sqlite MLflow store and the CLI


def _logged(history: dict) -> dict:
    """What the store holds (fewer keys than an engine run: sqlite round trips are slow): every layer's
    PCK@1, viewpoint bins of the supervised layer only."""
    return {k: h for k, h in history.items() if "/pck@1/" not in k or k.startswith(f"attn/{SUPERVISED}/")}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A small sweep in a real store: parent run, 9 finished trials, one failed trial; log_batch only."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("sweep-test", artifact_location=(root / "artifacts").as_uri())
    parent = client.create_run(experiment, run_name="sweep", tags={"sweep.name": "sweep-test"}).info.run_id
    ids = []
    for i, run in enumerate(synthetic_sweep() + [None]):
        failed = run is None
        params = synthetic_params(0.5, 7, i) if failed else run.params
        history = _logged(synthetic_metrics(0.5, 7, 2.0, 1000) if failed else run.metrics)
        tags = {"git.sha": f"sha{i % 2}", "sweep.trial": f"t{i}", "mlflow.parentRunId": parent,
                "gin_files": "gin/experiments/smoke.gin"}
        rid = client.create_run(experiment, run_name=f"trial{i}", tags=tags).info.run_id
        metrics = [Metric(to_mlflow_key(k), v, 0, s) for k, h in history.items() for s, v in h]
        for start in range(0, len(metrics), 1000):
            client.log_batch(rid, metrics=metrics[start:start + 1000],
                             params=[Param(k, v) for k, v in params.items()] if start == 0 else [])
        client.set_terminated(rid, status="FAILED" if failed else "FINISHED")
        ids.append(rid)
    client.log_batch(parent, tags=[RunTag("done", "true")])
    figure = root / "attention.png"  # the engine's final-step attention figure, for two of the three seed-0 arms
    figure.write_bytes(b"\x89PNG fake")
    for rid in ids[:2]:
        client.log_artifact(rid, str(figure), "figures/step_0004000")
    return uri, parent, ids


def test_cli_report_from_mlflow(store, tmp_path):
    from cameo_bench.cli import report as cli

    uri, parent, ids = store
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--experiment", "sweep-test", "--tracking-uri", uri, "--out", str(tmp_path),
                              "--bootstrap", "300", "--seed", "3"])
    assert cli.run(args) == 0
    out = tmp_path / "sweep-test"
    md = (out / "report.md").read_text()
    assert f"`cameo-bench report --experiment sweep-test --tracking-uri {uri} --out {tmp_path} --bootstrap 300 --seed 3`" in md
    for name in ("curves_eval_psnr.png", "curves_eval_lpips_vgg.png", "curves_attn_supervised_pck1.png",
                 "speedup_psnr.png", "profile_mv_dit_micro.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name
    sources = json.loads((out / "sources.json").read_text())
    used = {r["run_id"] for r in sources["runs"]}
    assert used == set(ids[:-1])  # every finished trial, not the failed one nor the parent
    assert {r["run_id"] for r in sources["left_out"]} == {ids[-1], parent}
    assert sources["git_shas"] == ["sha0", "sha1"]
    assert {r["gin_files"] for r in sources["runs"]} == {"gin/experiments/smoke.gin"}
    assert all(r["parent_run_id"] == parent for r in sources["runs"])
    assert "2.00× [2.00×, 2.00×]" in md and "status FAILED" in md
    assert "## Attention visualisation" in md
    assert (out / "attention_mv_dit_micro_00.png").read_bytes() == b"\x89PNG fake"
    assert (out / "attention_mv_dit_micro_01.png").exists()
    assert not (out / "attention_mv_dit_micro_02.png").exists()  # that run logged no figure


def test_fetch_artifact_copies_a_logged_file_or_says_none(store, tmp_path):
    from cameo_bench.tracking import fetch_artifact

    uri, _, ids = store
    got = fetch_artifact(ids[1], "figures/step_0004000/attention.png", tmp_path / "a" / "x.png", uri)
    assert got == tmp_path / "a" / "x.png" and got.read_bytes() == b"\x89PNG fake"
    assert fetch_artifact(ids[2], "figures/step_0004000/attention.png", tmp_path / "y.png", uri) is None


def test_load_runs_returns_the_engine_metric_names_and_histories(store):
    uri, parent, ids = store
    records = {r.run_id: r for r in load_runs("sweep-test", uri)}
    assert set(records) == set(ids) | {parent}
    expected = synthetic_sweep()[4]  # trial 4: the fast arm, seed 1
    got = records[ids[4]]
    assert got.status == "FINISHED" and got.params == expected.params and got.tags["sweep.trial"] == "t4"
    assert got.metrics == _logged(expected.metrics)  # "@" and "+" restored, steps sorted
    assert records[ids[-1]].status == "FAILED" and records[parent].metrics == {}
    assert from_mlflow_key(to_mlflow_key("attn/a/pck@0.5/90+")) == "attn/a/pck@0.5/90+"


def test_cli_report_names_a_missing_experiment(store, tmp_path, capsys):
    from cameo_bench.cli import report as cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert cli.run(parser.parse_args(["--experiment", "nope", "--tracking-uri", store[0], "--out", str(tmp_path)])) == 2
    err = capsys.readouterr().err
    assert "no MLflow experiment named 'nope'" in err and "sweep-test" in err  # lists the experiments found


# ---------------------------------------------------------------------------------------------
# what the engine writes is what the report reads


def test_a_run_written_by_the_engine_reads_back_under_the_reports_names(store, tmp_path, monkeypatch):
    """Two smoke trainings (CAMEO and its baseline) logged by `cameo-bench train` into the store, read
    back with `load_runs` and reported: the supervised layer, the layer order and the metrics must
    arrive under the names the report reads (it once read a tag the engine logged as a param, and a
    layer-order tag nothing wrote)."""
    import torch

    from backbones import create_backbone
    from cameo_bench.__main__ import main
    from cameo_bench.report.runs import backbone_of
    from cameo_bench.tracking import fetch_artifact
    from cameo_bench.tracking.labels import run_label

    uri = store[0]
    monkeypatch.chdir(tmp_path)
    for name, weight in (("cameo", 0.5), ("base", 0.0)):
        bindings = [f"run_experiment.output_dir = '{tmp_path / 'runs'}'", f"run_experiment.name = '{name}'",
                    f"cameo.weight = {weight}", "train.steps = 2", "eval.every = 2", "eval.at_start = True",
                    "train.checkpoint_every = 2", "eval.lpips = False"]
        argv = ["train", "gin/experiments/smoke.gin", "--no-progress", "--tracking-uri", uri, "--experiment", "roundtrip"]
        assert main(argv + [a for b in bindings for a in ("--gin_param", b)]) == 0

    with torch.device("meta"):  # smoke.gin's backbone, for its layer names in forward order
        layers = [layer.name for layer in create_backbone("mv_dit", "micro").attention_layers()]
    supervised = "blocks.00.attn"  # `depth:0.5` of the two-block micro DiT (smoke.gin's selector)
    runs = {r.params[keys.EXPERIMENT_NAME]: r for r in load_runs("roundtrip", uri)}
    cameo, base = runs["cameo"], runs["base"]

    # interface 9: both layer facts are tags, and the resolved layer is no longer a param
    assert cameo.tags[keys.LAYER_RESOLVED] == supervised
    assert cameo.tags[keys.ATTN_LAYERS].split(",") == layers
    assert keys.LAYER_RESOLVED not in cameo.params and keys.LAYER_RESOLVED not in base.params
    assert supervised_layer(cameo) == supervised and supervised_layer(base) is None

    # the params the labels and the baseline rule read
    assert run_label(cameo.params, supervised_layer(cameo)) == f"mv_dit micro · CAMEO λ0.5 @{supervised} · s0"
    assert run_label(base.params) == "mv_dit micro · baseline · s0"
    assert (cameo.name, base.name) == (run_label(cameo.params, supervised), run_label(base.params))  # THE run names
    assert is_baseline(base) and not is_baseline(cameo) and backbone_of(cameo) == "mv_dit/micro"

    # the metrics, at the evaluation steps, under the names the report reads
    for run in (cameo, base):
        for key in [keys.PSNR, keys.SSIM] + [keys.attn(layer, keys.PCK1) for layer in layers]:
            assert [s for s, _ in run.metrics.get(key, [])] == [0, 2], (run.name, key)
    assert [s for s, _ in cameo.metrics[keys.SUPERVISED_PCK1]] == [0, 2]
    assert keys.SUPERVISED_PCK1 not in base.metrics

    report = build_report(list(runs.values()), tmp_path / "report", experiment="roundtrip", n_boot=20,
                          fetch=lambda run, path, dst: fetch_artifact(run.run_id, path, dst, uri))
    variants = {v.label: v for v in report.grouping.variants}
    assert set(variants) == {"baseline", "cameo"} and variants["cameo"].baseline is variants["baseline"]
    assert variants["cameo"].layer == supervised
    for metric in (keys.PSNR, keys.SSIM, keys.SUPERVISED_PCK1):  # the baseline is read at the supervised layer
        assert report.comparison("cameo", metric).steps.tolist() == [0, 2], metric
    md = (tmp_path / "report" / "report.md").read_text()
    profile = [line.split("|")[1].strip() for line in md.splitlines()
               if line.startswith("| blocks.")]  # the per-layer profile table, in forward order
    assert profile == layers
    assert "## Attention visualisation" in md  # the engine's figure, at the path the report asks for
    assert (tmp_path / "report" / "attention_mv_dit_micro_00.png").read_bytes()[:4] == b"\x89PNG"


def test_report_leaves_out_trials_their_sweep_file_no_longer_defines(tmp_path):
    """A sweep whose file changed a backbone's step count trains new trials; the old trials' runs
    stay in the experiment but are not the sweep any more, so the report lists them as left out."""
    runs = synthetic_sweep()
    for i, run in enumerate(runs):
        run.tags.update({"sweep.name": "s", "sweep.trial": f"t{i}"})
    parent = RunRecord("parent", "sweep:s", {}, {"sweep.name": "s", "sweep.role": "parent"}, {})
    old = runs[3]  # the baseline of seed 1: trial t3 is gone from the grid
    grid = [{"id": f"t{i}"} for i in range(len(runs)) if i != 3]
    other = RunRecord("other", "x", synthetic_params(0.5, 1, 99), {"sweep.name": "elsewhere", "sweep.trial": "t3"},
                      synthetic_metrics(0.5, 1, 2.0, 100))

    def fetch(run, path, dst):
        if run.run_id != "parent" or path != "sweep/trials.json":
            return None
        dst.write_text(json.dumps(grid))
        return dst

    report = build_report([parent, *runs, other], tmp_path / "r", experiment="s", n_boot=50, draw=False, fetch=fetch)
    left_out = {r.run_id: why for r, why in report.skipped}
    assert "no longer in the grid of sweep 's'" in left_out[old.run_id] and "t3" in left_out[old.run_id]
    assert "other" not in left_out  # another sweep's trial of the same id, and that sweep has no list
    used = {r.run_id for v in report.grouping.variants for r in v.runs}
    assert used == {r.run_id for r in runs if r is not old} | {"other"}
    # without the parent's list nothing is filtered
    assert old.run_id not in {r.run_id for r, _ in build_report(
        runs, tmp_path / "r2", experiment="s", n_boot=50, draw=False, fetch=lambda *a: None).skipped}


def test_layer_study_table_sets_each_supervised_layer_beside_its_emergent_pck(tmp_path):
    """Baseline PCK@1 per layer is 0.3 + 0.1 j (blocks.03 most emergent, 0.6); CAMEO at blocks.01 runs
    2x and plateaus 1 dB higher, at blocks.03 runs 2x on the baseline's plateau: the best layer to
    supervise is then not the most emergent one, and the gaps are the analytic ones."""
    def supervised_at(layer, metrics):
        out = {k: h for k, h in metrics.items() if k != "attn/supervised/pck@1"}
        out["attn/supervised/pck@1"] = out[f"attn/{layer}/pck@1"]
        return out

    runs = []
    for seed in range(3):
        runs.append(RunRecord(f"b{seed}", "b", synthetic_params(0.0, seed, len(runs)), {},
                              synthetic_metrics(0.0, seed, 1.0, 200)))
        for layer, plateau in (("blocks.01.attn", 6.0), ("blocks.03.attn", 5.0)):
            params = {**synthetic_params(0.5, seed, len(runs)), "cameo.layer": layer}
            runs.append(RunRecord(f"{layer}{seed}", layer, params, {keys.LAYER_RESOLVED: layer},
                                  supervised_at(layer, synthetic_metrics(0.0, seed, 2.0, 100, plateau))))
    build_report(runs, tmp_path / "r", experiment="layers", n_boot=200, draw=False)
    md = (tmp_path / "r" / "report.md").read_text()
    section = md[md.index("## Supervised layer vs emergent correspondence"):]
    base_final = [psnr(4000, TIME_SCALES[s]) for s in range(3)]
    gap01 = np.mean([psnr(8000, TIME_SCALES[s], 6.0) - b for s, b in enumerate(base_final)])
    emergent03 = 0.6 * (1 - math.exp(-4000 / 500))
    assert f"| blocks.03.attn | {emergent03:.3f} |" in section
    assert f"| blocks.01.attn | {0.4 * (1 - math.exp(-4000 / 500)):.3f} |" in section
    assert f"{gap01:+.3f} [" in section
    assert "Layers by emergent PCK@1 (high to low): blocks.03.attn, blocks.01.attn" in section
    assert "Layers by eval/psnr gain (high to low): blocks.01.attn, blocks.03.attn" in section
    assert "**different layers**" in section
    # one supervised layer (every other report): no such section
    build_report(synthetic_sweep(), tmp_path / "s", experiment="s", n_boot=50, draw=False)
    assert "emergent correspondence" not in (tmp_path / "s" / "report.md").read_text()


def test_a_knob_added_after_some_runs_does_not_split_their_variants():
    runs = synthetic_sweep()  # 3 arms x 3 seeds
    for run in runs[::2]:  # runs logged after a knob was added log its default
        run.params["diffusion.min_snr_gamma"] = "0.0"
    grouping = group_runs(runs)
    assert sorted(len(v.runs) for v in grouping.variants) == [3, 3, 3]
    assert "diffusion.min_snr_gamma" not in grouping.varying
    assert all(r.params["diffusion.min_snr_gamma"] == "0.0" for v in grouping.variants for r in v.runs)
    runs[1].params["diffusion.min_snr_gamma"] = "5.0"  # two values: a real axis, nothing is filled in
    grouping = group_runs(runs)
    assert "diffusion.min_snr_gamma" in grouping.varying and len(grouping.variants) > 3
