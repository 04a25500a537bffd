"""Run archives: an experiment's runs written to a committed file and read back, checked against
the store reader (`load_runs`) on a store built by hand, and end to end: a real sweep exported,
imported into a fresh store, resumed there, and reported from the file."""
import argparse
import gzip
import json
import pathlib

import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from cameo_bench import tracking
from cameo_bench.cli import archive as archive_cli
from cameo_bench.cli import report as report_cli
from cameo_bench.tracking import keys, run_archive

from test_sweep import FAST, SMOKE, cli as sweep_cli, write_sweep  # noqa: F401 - SMOKE: the sweeps' base

ALL = ("",)  # every metric prefix


def _cli(module, argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args([str(a) for a in argv]))


@pytest.fixture
def stores(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return [tracking.ensure_store(f"sqlite:///{tmp_path / name / 'mlflow.db'}") for name in ("a", "b")]


def _hand_built(uri):
    """A sweep parent with its trial list and two children: an escaped key, a step logged twice
    (the later value counts), one child still RUNNING."""
    client = MlflowClient(uri)
    exp = tracking.get_or_create_experiment("study", uri)
    parent = client.create_run(exp, run_name="sweep", tags={keys.SWEEP_ROLE: "parent", keys.SWEEP_NAME: "study"})
    client.log_text(parent.info.run_id, json.dumps([{"id": "t1"}, {"id": "t2"}]), keys.ARTIFACT_SWEEP_TRIALS)
    client.set_terminated(parent.info.run_id, "FINISHED")
    ids = {}
    for trial, status in (("t1", "FINISHED"), ("t2", "RUNNING")):
        run = client.create_run(exp, run_name=f"trial {trial}", start_time=1_000 * len(ids) + 5,
                                tags={keys.PARENT_RUN_ID: parent.info.run_id, keys.SWEEP_TRIAL: trial,
                                      keys.SWEEP_NAME: "study", "not_computed.eval/floor": "no references"})
        rid = run.info.run_id
        client.log_batch(rid, params=[Param("cameo.weight", "0.05")])
        client.log_batch(rid, metrics=[Metric(tracking.to_mlflow_key("diag/attn/blocks.00.attn/pck@1/90+"), 0.5, 10, 0),
                                       Metric("eval/psnr", 15.0, 10, 0), Metric("eval/psnr", 16.0, 20, 500),
                                       Metric("eval/psnr", 16.5, 30, 500), Metric("train/loss", 0.3, 10, 1)])
        if status != "RUNNING":
            client.set_terminated(rid, status, end_time=99_000)
        ids[trial] = rid
    return parent.info.run_id, ids


def _as_compared(record):
    tags = {k: v for k, v in record.tags.items() if k != run_archive.ARCHIVED_FROM}
    return (record.name, record.params, tags, record.metrics, record.start_time)


def test_an_archive_reads_like_the_store_and_imports_into_a_fresh_one(stores, tmp_path):
    a, b = stores
    parent_id, ids = _hand_built(a)
    path = tmp_path / "reports" / "study" / "runs.json.gz"
    assert run_archive.export_experiment("study", path, a) == 3
    first = path.read_bytes()
    assert run_archive.export_experiment("study", path, a) == 3 and path.read_bytes() == first  # stable bytes

    experiment, records, texts = run_archive.read_archive(path)
    from_store = {r.run_id: r for r in tracking.load_runs("study", a, metric_prefixes=ALL)}
    assert experiment == "study" and {r.run_id for r in records} == set(from_store)
    for record in records:
        assert _as_compared(record) == _as_compared(from_store[record.run_id])
        assert record.status == from_store[record.run_id].status
    t1 = next(r for r in records if r.run_id == ids["t1"])
    assert t1.metrics["eval/psnr"] == [(0, 15.0), (500, 16.5)]
    assert t1.metrics["diag/attn/blocks.00.attn/pck@1/90+"] == [(0, 0.5)]
    assert texts[(parent_id, keys.ARTIFACT_SWEEP_TRIALS)].startswith('[{"id": "t1"}')

    assert run_archive.import_archive(path, b) == (3, 0)
    assert run_archive.import_archive(path, b) == (0, 3)  # twice adds nothing
    assert run_archive.import_archive(path, a) == (0, 3)  # nor into the store it came from
    imported = {r.name: r for r in tracking.load_runs("study", b, metric_prefixes=ALL)}
    originals = {r.name: r for r in from_store.values()}
    assert set(imported) == set(originals)
    new_parent = imported["sweep"].run_id
    for name, record in imported.items():
        original = originals[name]
        assert record.run_id != original.run_id and record.tags[run_archive.ARCHIVED_FROM] == original.run_id
        assert record.params == original.params and record.metrics == original.metrics
        assert record.start_time == original.start_time
        tags = {k: v for k, v in record.tags.items() if k not in (run_archive.ARCHIVED_FROM, keys.ERROR)}
        expected = dict(original.tags)
        if keys.PARENT_RUN_ID in expected:
            assert tags[keys.PARENT_RUN_ID] == new_parent  # the link follows the parent to its new id
            expected[keys.PARENT_RUN_ID] = new_parent
        assert tags == expected
    assert imported["trial t1"].status == "FINISHED" and imported["trial t1"].end_time == 99.0
    assert imported["trial t2"].status == "KILLED" and "RUNNING" in imported["trial t2"].tags[keys.ERROR]
    text = MlflowClient(b).download_artifacts(new_parent, keys.ARTIFACT_SWEEP_TRIALS, str(tmp_path))
    assert json.loads(pathlib.Path(text).read_text()) == [{"id": "t1"}, {"id": "t2"}]


def test_a_file_that_is_no_archive_is_named(stores, tmp_path, capsys):
    bad = tmp_path / "runs.json.gz"
    bad.write_text("not gzip")
    assert _cli(archive_cli, ["import", bad, "--tracking-uri", stores[0]]) == 2
    assert str(bad) in capsys.readouterr().err
    with gzip.open(bad, "wt") as f:
        json.dump({"format": "other/9", "runs": []}, f)
    with pytest.raises(ValueError, match="other/9"):
        run_archive.read_archive(bad)
    assert _cli(archive_cli, ["export", "--experiment", "nope", "--tracking-uri", stores[0]]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.slow
def test_a_sweep_exported_imported_into_a_fresh_store_resumes_there_and_reports_from_the_file(
        stores, tmp_path, monkeypatch, capsys):
    a, b = stores
    path = write_sweep(tmp_path, "arch", {"cameo.weight": [0.0, 0.5]},
                       fixed=["train.steps = 2", "eval.every = 2", "train.checkpoint_every = 2", "eval.lpips = False"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", a)
    archive = tmp_path / "runs.json.gz"
    assert sweep_cli([path, "--workers", 0, "--archive", archive]) == 0
    out = capsys.readouterr().out
    assert "archived 2 runs" in out and out.rstrip().count("archived 3 runs") == 2  # after each trial, at the end
    assert {r.status for r in run_archive.read_archive(archive).runs} == {"FINISHED"}  # the parent's end included
    first = archive.read_bytes()
    assert _cli(archive_cli, ["export", "--experiment", "arch", "--out", archive]) == 0
    assert "3 runs" in capsys.readouterr().out and archive.read_bytes() == first  # the parent and two trials

    # the report from the file is the report from the store (tables; the archive keeps no figures)
    assert _cli(report_cli, ["--experiment", "arch", "--out", tmp_path / "from_store", "--no-plots"]) == 0
    assert _cli(report_cli, ["--archive", archive, "--out", tmp_path / "from_file", "--no-plots", "--name", "arch"]) == 0
    capsys.readouterr()
    store_md = (tmp_path / "from_store" / "arch" / "report.md").read_text().splitlines()
    file_md = (tmp_path / "from_file" / "arch" / "report.md").read_text().splitlines()
    differing = [(x, y) for x, y in zip(store_md, file_md) if x != y]
    assert len(store_md) == len(file_md) and len(differing) <= 2, differing  # where the runs came from, the command
    assert all("report" in x or "sqlite" in x or "runs.json.gz" in y for x, y in differing), differing

    monkeypatch.setenv("MLFLOW_TRACKING_URI", b)
    assert _cli(archive_cli, ["import", archive]) == 0
    assert "imported 3 runs" in capsys.readouterr().out
    assert sweep_cli([path, "--workers", 0]) == 0
    assert "2 already finished, 0 to run" in capsys.readouterr().out
