"""What a researcher sees in the MLflow UI, checked through the client API of a real sqlite store:
run names and tags of a quickstart-like sweep, honest baseline params, metrics that could not be
computed, metric names whose chart sections put the answer first, figures as images by step, the
landing addresses of `make ui`, old metric names still read, and a UI server that stops whole.

The quickstart-like sweep (mv_dit / mv_unet micro x lambda 0 / 0.5, two steps) is trained once per
module (~30-60 s on a shared 2-core box).
"""
import contextlib
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.parse

import pytest
from mlflow.tracking import MlflowClient

from cameo_bench import sweep, tracking
from cameo_bench.tracking import keys, ui
from cameo_bench.tracking.labels import run_label
from cameo_bench.tracking.process_group import group_members, start_group, stop_group

REPO = pathlib.Path(__file__).resolve().parents[1]
DIT_LAYER = "blocks.00.attn"  # `depth:0.5` of the two-block micro DiT
UNET_LAYER = "up.01.attn.00"
QUICKSTART_AXES = {
    "backbone": [
        {"backbone.name": "mv_dit", "backbone.preset": "micro", "cameo.layer": "depth:0.5"},
        {"backbone.name": "mv_unet", "backbone.preset": "micro", "cameo.layer": UNET_LAYER},
    ],
    "cameo.weight": [0.0, 0.5],
}


def new_store(folder: pathlib.Path, template: pathlib.Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(template, folder / "mlflow.db")
    return f"sqlite:///{folder / 'mlflow.db'}"


@pytest.fixture(scope="module")
def template_db(tmp_path_factory):
    """An empty store (creating the schema runs ~100 migrations: made once, then copied)."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    tracking.ensure_store(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory, template_db):
    """The quickstart's four arms, two steps each, in one sweep (in-process trials), with no LPIPS
    weights on disk: `(uri, {(backbone, variant): Run})`."""
    root = tmp_path_factory.mktemp("quickstart")
    uri = new_store(root, template_db)
    hub = root / "empty-torch-hub"
    hub.mkdir()
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "TORCH_HOME")}
    os.environ["MLFLOW_TRACKING_URI"], os.environ["TORCH_HOME"] = uri, str(hub)  # torch.hub.get_dir() -> hub/hub
    try:
        spec = sweep.SweepSpec(
            name="qs", base=["gin/experiments/smoke.gin"], output_dir=str(root / "runs"), axes=QUICKSTART_AXES,
            fixed=["train.steps = 2", "eval.every = 2", "train.checkpoint_every = 2", "eval.lpips = True"])
        results = sweep.run(sweep.plan(spec), executor="local", workers=0, uri=uri, echo=lambda *a: None)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert [r.status for r in results] == ["FINISHED"] * 4, [r.error for r in results]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("qs")
    runs = client.search_runs([experiment.experiment_id])
    children = {(r.data.tags[keys.BACKBONE], r.data.tags[keys.VARIANT]): r for r in runs
                if r.data.tags.get(keys.SWEEP_ROLE) != "parent"}
    return uri, experiment.experiment_id, children, [r for r in runs if r.data.tags.get(keys.SWEEP_ROLE) == "parent"]


# ---------------------------------------------------------------------------------------------
# names and tags


def test_the_four_runs_are_named_by_backbone_arm_layer_and_seed(quickstart):
    _, _, runs, _ = quickstart
    names = {key: run.info.run_name for key, run in runs.items()}
    assert names == {("mv_dit", "baseline"): "mv_dit micro · baseline · s0",
                     ("mv_dit", "cameo"): f"mv_dit micro · CAMEO λ0.5 @{DIT_LAYER} · s0",
                     ("mv_unet", "baseline"): "mv_unet micro · baseline · s0",
                     ("mv_unet", "cameo"): f"mv_unet micro · CAMEO λ0.5 @{UNET_LAYER} · s0"}
    for run in runs.values():  # the summary table and the report use the same function
        assert run.info.run_name == run_label(run.data.params, run.data.tags[keys.LAYER_RESOLVED])
        assert "name=" not in run.info.run_name and "{" not in run.info.run_name


def test_every_run_has_the_tags_the_runs_table_groups_and_filters_by(quickstart):
    uri, experiment_id, runs, _ = quickstart
    cameo = runs["mv_dit", "cameo"].data.tags
    assert {k: cameo[k] for k in ("variant", "backbone", "preset", "layer", "lambda", "source", "seed")} == {
        "variant": "cameo", "backbone": "mv_dit", "preset": "micro", "layer": DIT_LAYER, "lambda": "0.5",
        "source": "depth", "seed": "0"}
    base = runs["mv_unet", "baseline"].data.tags
    assert {k: base[k] for k in ("variant", "backbone", "layer", "lambda", "source", "seed")} == {
        "variant": "baseline", "backbone": "mv_unet", "layer": "none", "lambda": "0", "source": "none", "seed": "0"}
    found = MlflowClient(uri).search_runs([experiment_id], "tags.variant = 'cameo' and tags.backbone = 'mv_unet'")
    assert [r.info.run_name for r in found] == [f"mv_unet micro · CAMEO λ0.5 @{UNET_LAYER} · s0"]


def test_a_collapsed_baseline_logs_none_for_cameo_settings_never_a_sibling_arms(quickstart):
    """The sweep keeps the base file's `cameo.layer = depth:0.5` (the DiT arm's selector) for the
    mv_unet baseline; it used to be logged, as if three runs were at depth:0.5."""
    _, _, runs, _ = quickstart
    for backbone in ("mv_unet", "mv_dit"):
        params, tags = runs[backbone, "baseline"].data.params, runs[backbone, "baseline"].data.tags
        assert params["cameo.weight"] == "0.0"
        assert {params[k] for k in params if k.startswith("cameo.") and k != "cameo.weight"} == {"none"}
        assert tags[keys.LAYER_RESOLVED] == "none"
    assert runs["mv_unet", "cameo"].data.params["cameo.layer"] == UNET_LAYER
    assert runs["mv_dit", "cameo"].data.params["cameo.layer"] == "depth:0.5"


def test_a_metric_that_could_not_be_computed_is_a_tag_saying_why(quickstart):
    """`eval.lpips = True` without the VGG weights on disk: no LPIPS metric, and the run says why."""
    _, _, runs, _ = quickstart
    run = runs["mv_dit", "cameo"]
    assert run.data.params["eval.lpips"] == "True" and keys.LPIPS_VGG not in run.data.metrics
    why = run.data.tags[keys.not_computed(keys.LPIPS_VGG)]
    assert "not found" in why and "vgg16" in why


# ---------------------------------------------------------------------------------------------
# metric names and chart sections


def chart_section(mlflow_key: str) -> str:
    """MLflow 3.17's chart section of a metric, as its JS computes it (`extractChartSectionName`):
    the key up to its last "/" ("Model metrics" for a key without one)."""
    return mlflow_key.rsplit("/", 1)[0] if "/" in mlflow_key else "Model metrics"


def test_headline_metrics_come_before_the_per_layer_diagnostics(quickstart):
    _, _, runs, _ = quickstart
    metrics = runs["mv_dit", "cameo"].data.metrics
    assert {keys.PSNR, keys.SSIM, keys.PCK_SUPERVISED} <= set(metrics)
    assert metrics[keys.PCK_SUPERVISED] == metrics[tracking.to_mlflow_key(keys.SUPERVISED_PCK1)]
    assert not [k for k in metrics if k.startswith(keys.LEGACY_ATTN)], "attention metrics under their old names"
    assert any(k.startswith(keys.DIAG + "attn/") for k in metrics)
    sections = sorted({chart_section(k) for k in metrics if "/" in k})  # the UI sorts section names
    diag = [i for i, s in enumerate(sections) if s.startswith(keys.DIAG)]
    answer = [i for i, s in enumerate(sections) if s.startswith((keys.EVAL.rstrip("/"), "train", "time", "figures"))]
    assert answer and diag and max(answer) < min(diag), sections


def test_the_engine_reference_names_map_to_todays_names():
    """tests/test_engine_reference.py's fixture holds the names of its day: `keys.current_name` maps them."""
    assert keys.current_name("attn/blocks.00.attn/pck@1") == keys.attn("blocks.00.attn", keys.PCK1)
    assert keys.current_name("attn/supervised/epe") == keys.SUPERVISED_EPE
    for name in (keys.PSNR, keys.SUPERVISED_PCK1, "train/loss_cameo", "perturb/base/psnr"):
        assert keys.current_name(name) == name


# ---------------------------------------------------------------------------------------------
# figures


def test_figures_are_images_by_key_and_step_and_root_files_for_the_compare_page(quickstart):
    uri, _, runs, _ = quickstart
    client = MlflowClient(uri)
    for run in runs.values():
        run_id = run.info.run_id
        images = [f.path for f in client.list_artifacts(run_id, "images")]
        # MLflow's own layout: images/<key with / as ~>+step+<step>+timestamp+<ms>+<uuid>[.png | +compressed.webp]
        logged = {(m["key"].replace("~", "/"), int(m["step"])) for p in images
                  if (m := re.match(r"images/(?P<key>.+?)\+step\+(?P<step>\d+)\+timestamp\+\d+\+[\w-]+\.png$", p))}
        assert logged == {(keys.figure_key(keys.SAMPLES_FIGURE), 2), (keys.figure_key(keys.ATTENTION_FIGURE), 2)}
        assert run.data.tags.get("mlflow.loggedImages", "").lower() == "true"  # what the UI checks first
        files = [f.path for f in client.list_artifacts(run_id, keys.figures_folder(2))]
        assert f"{keys.figures_folder(2)}/{keys.ATTENTION_FIGURE}" in files  # the report still fetches these
        # the compare page shows the root files every compared run has: the latest figures
        root = {f.path for f in client.list_artifacts(run_id) if not f.is_dir}
        assert {keys.SAMPLES_FIGURE, keys.ATTENTION_FIGURE} <= root


# ---------------------------------------------------------------------------------------------
# where `make ui` lands


def test_landing_is_the_runs_table_in_model_training_mode_and_the_newest_sweep(quickstart):
    uri, experiment_id, runs, parents = quickstart
    where = ui.landing(uri, "http://127.0.0.1:5000")
    assert where.experiment == "qs"
    table = f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    assert where.runs.startswith(table + "&")  # the mode MLflow 3 reads before its remembered choice
    query = urllib.parse.parse_qs(where.runs.split("?", 1)[1])
    assert query["searchFilter"] == ["tags.variant IS NOT NULL"]  # the trials as rows, not under a parent
    assert query["orderByKey"] == ["tags.`mlflow.runName`"] and query["orderByAsc"] == ["true"]
    client = MlflowClient(uri)  # the filter keeps exactly the four trials: the parent has no `variant` tag
    assert {r.info.run_id for r in client.search_runs([experiment_id], query["searchFilter"][0])} == \
        {r.info.run_id for r in runs.values()}
    assert len(parents) == 1
    assert where.sweep == (f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{parents[0].info.run_id}"
                           "?workflowType=machine_learning")
    text = ui.describe(where, uri)
    assert where.runs in text and where.sweep in text and "variant" in text


def test_landing_names_an_unknown_experiment_and_an_empty_store(tmp_path, template_db):
    uri = new_store(tmp_path, template_db)
    assert ui.landing(uri, "http://h:1").runs is None
    client = MlflowClient(uri)
    old = client.create_experiment("older")
    new = client.create_experiment("newer")
    client.create_run(old)
    time.sleep(0.01)
    client.create_run(new)
    assert ui.landing(uri, "http://h:1").experiment == "newer"
    assert ui.landing(uri, "http://h:1", "older").sweep is None
    with pytest.raises(KeyError, match=r"'nope'.*found: \['Default', 'newer', 'older'\]"):
        ui.landing(uri, "http://h:1", "nope")


# ---------------------------------------------------------------------------------------------
# runs logged before the rename still read


def test_a_run_logged_under_old_names_reads_under_todays(tmp_path, template_db):
    from mlflow.entities import Metric

    uri = new_store(tmp_path, template_db)
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("old")).info.run_id
    old = {"attn/blocks.01.attn/pck_at_1": 0.4, "attn/supervised/pck_at_1": 0.4, "eval/psnr": 12.0}
    client.log_batch(run_id, metrics=[Metric(k, v, 0, 5) for k, v in old.items()])
    (record,) = tracking.load_runs("old", uri)
    assert record.metrics == {keys.attn("blocks.01.attn", keys.PCK1): [(5, 0.4)], keys.SUPERVISED_PCK1: [(5, 0.4)],
                              keys.PSNR: [(5, 12.0)]}
    folder = tmp_path / "run"  # a run folder of that time
    folder.mkdir()
    (folder / keys.METRICS_FILE).write_text('{"step": 3, "key": "attn/x/pck@1", "value": 0.5}\n')
    assert tracking.read_metrics(folder) == {keys.attn("x", keys.PCK1): [(3, 0.5)]}


# ---------------------------------------------------------------------------------------------
# a server that stops whole


STAND_IN = textwrap.dedent("""
    # a stand-in `mlflow ui`: a worker child (like uvicorn's) that ignores SIGTERM, and /health
    import http.server, signal, subprocess, sys
    worker = subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404); self.end_headers()
        def log_message(self, *a): pass
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")
LAUNCHER = textwrap.dedent("""
    import sys
    from cameo_bench.tracking import process_group, ui
    ui.server_available = lambda: True
    ui.server_command = lambda uri, port: [sys.executable, "-c", sys.argv[1], str(port)]
    original = process_group.stop_group
    ui.stop_group = lambda proc: original(proc, grace=1.0)
    sys.exit(ui.main(sys.argv[2:]))
""")


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def children_of(pid: int) -> list[int]:
    out = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if int(text[text.rfind(")") + 2:].split()[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def launch(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})


def wait_ready(proc: subprocess.Popen, timeout: float) -> tuple[int, list[int]]:
    """Once the launcher's server answers: (the server's group id, the group's pids)."""
    deadline = time.monotonic() + timeout
    seen = []
    for line in proc.stdout:  # the launcher prints `ready:` once /health answers
        seen.append(line)
        if line.startswith("ready:") or time.monotonic() > deadline:
            break
    assert any(line.startswith("ready:") for line in seen), "".join(seen)
    leaders = [pid for pid in children_of(proc.pid) if os.getpgid(pid) == pid]
    assert len(leaders) == 1, "the server must lead its own process group"
    members = group_members(leaders[0])
    assert len(members) >= 2, "the server and its worker(s)"
    return leaders[0], members


def assert_all_gone(pgid: int, members: list[int], port: int, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and (group_members(pgid) or port_open(port)):
        time.sleep(0.2)
    assert group_members(pgid) == [] and not port_open(port)
    alive = [pid for pid in members if pathlib.Path(f"/proc/{pid}").exists()
             and pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    assert alive == [], "re-parented server processes left serving"


@pytest.mark.slow
@pytest.mark.skipif(not pathlib.Path("/proc").is_dir(), reason="reads process groups from /proc")
def test_stop_signals_and_the_parents_death_stop_the_whole_server_group(tmp_path, template_db):
    """SIGTERM, SIGINT and SIGHUP to the launcher, and the death of its parent (`make ui` killed: the
    launcher is re-parented and notices), each stop the server and its worker, which ignores SIGTERM.
    The four launchers start side by side: each pays ~5-20 s of imports."""
    uri = new_store(tmp_path, template_db)
    cases = {}
    for case in ("SIGTERM", "SIGINT", "SIGHUP", "parent dies"):
        port = ui.free_port()
        launcher = [sys.executable, "-c", LAUNCHER, STAND_IN, "--tracking-uri", uri, "--port", str(port), "--timeout", "60"]
        if case == "parent dies":  # the parent stands for make: it starts the launcher and waits
            launcher = [sys.executable, "-c", "import subprocess, sys; sys.exit(subprocess.Popen(sys.argv[1:]).wait())",
                        *launcher]
        cases[case] = (launch(launcher), port)
    try:
        check_each_stop(cases)
    finally:  # a failed case must not leave the other launchers and their servers running
        for proc, _ in cases.values():
            kill_tree(proc)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL `proc`, its children and every process group they lead (the servers and workers)."""
    todo, seen = [proc.pid], []
    while todo:
        pid = todo.pop()
        seen.append(pid)
        todo += children_of(pid)
    for pid in seen:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
            os.kill(pid, signal.SIGKILL)
    proc.wait()


def check_each_stop(cases: dict) -> None:
    for case, (proc, port) in cases.items():
        if case == "parent dies":
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and not port_open(port):
                time.sleep(0.2)
            (launcher_pid,) = children_of(proc.pid)
            (pgid,) = [pid for pid in children_of(launcher_pid) if os.getpgid(pid) == pid]
            members = group_members(pgid)
            proc.kill()
            proc.wait()
        else:
            pgid, members = wait_ready(proc, 90)
            proc.send_signal(getattr(signal, case))
            try:
                code = proc.wait(timeout=60)  # under load (a full suite on 2 shared cores) exits took > 30 s
            except subprocess.TimeoutExpired:
                pytest.fail(f"{case}: the launcher did not exit within 60 s of the signal")
            assert code == 0, case
        assert_all_gone(pgid, members, port)


def test_stop_group_kills_what_ignores_sigterm():
    proc = start_group([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                        "time.sleep(600)"])
    time.sleep(0.3)
    tic = time.monotonic()
    stop_group(proc, grace=0.5)
    assert proc.returncode == -signal.SIGKILL and time.monotonic() - tic < 5
    assert group_members(proc.pid) == []
    stop_group(proc, grace=0.5)  # twice is harmless


@pytest.mark.slow
@pytest.mark.skipif(not ui.server_available(), reason="the real MLflow server needs the `ui` extra "
                    "(pip install -e '.[ui]', ~800 MB; `make test` installs only '.[dev]')")
def test_the_real_mlflow_ui_stops_whole_on_sigterm(tmp_path, template_db):
    """`mlflow ui` itself: its CLI process, uvicorn and its workers, huey consumers (~30 s to start)."""
    uri, port = new_store(tmp_path, template_db), ui.free_port()
    proc = launch([sys.executable, "-m", "cameo_bench", "ui", "--tracking-uri", uri, "--port", str(port), "--timeout", "170"])
    pgid, members = wait_ready(proc, 180)
    assert port_open(port)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert_all_gone(pgid, members, port, within=30)
