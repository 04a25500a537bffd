"""`make ui` / `cameo-bench ui`: the MLflow UI for this project's store, on 127.0.0.1, opened on the runs table.

Prints two addresses: the experiment's runs table in MLflow's "Model training" mode (MLflow 3 opens
an experiment in its GenAI mode, on a traces overview, unless the address says
`workflowType=machine_learning`; its JS reads that query parameter before its remembered choice) and
the newest sweep's parent run. The server runs as its own process group, stopped whole on SIGTERM,
SIGINT and SIGHUP and when this launcher's parent dies (`process_group`).

The UI needs the full `mlflow` package (the `ui` extra: Flask, uvicorn, ~800 MB); training only
needs mlflow-skinny. Bound to the loopback because the UI has no authentication: reach it from
another machine through an SSH tunnel (`ssh -L PORT:127.0.0.1:PORT host`).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import metadata
from urllib.parse import quote

from cameo_bench.tracking import keys
from cameo_bench.tracking.process_group import start_group, stop_group

HOST = "127.0.0.1"
INSTALL_HINT = "pip install -e '.[ui]'   (or: make ui, which installs it)"
MODEL_TRAINING = "workflowType=machine_learning"  # MLflow 3's query parameter for the runs-table mode
# SIGINT too, explicitly: a launcher started in the background by a non-interactive shell inherits
# SIGINT as ignored, and Python then installs no KeyboardInterrupt handler (seen: a test hung on it)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def server_available() -> bool:
    """The full `mlflow` distribution with its web server, not only mlflow-skinny."""
    try:
        metadata.version("mlflow")
    except metadata.PackageNotFoundError:
        return False
    return importlib.util.find_spec("flask") is not None and importlib.util.find_spec("uvicorn") is not None


def free_port(host: str = HOST) -> int:
    """A port nothing listens on now (the OS picks it; a tiny race with other programs remains)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def server_command(uri: str, port: int) -> list[str]:
    from cameo_bench.tracking import default_artifact_root

    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", HOST, "--port", str(port)]
    root = default_artifact_root(uri)
    if root:
        cmd += ["--default-artifact-root", root]
    return cmd


# ---------------------------------------------------------------------------------------------
# where to land


@dataclass
class Landing:
    """The addresses `make ui` prints: the runs table of `experiment`, and its newest sweep's
    parent run (None without a sweep). `experiment` is None when the store has no runs yet."""

    base: str
    experiment: str | None = None
    runs: str | None = None
    sweep: str | None = None
    sweep_name: str | None = None


# The runs table lists a sweep's trials under its parent run, collapsed: a new user saw one row, and
# the parent (no metrics) took the first legend entry of every chart. Runs with a `variant` tag (every
# training run, CLI or sweep trial; a sweep's parent has none) at top level, sorted by name (so by
# backbone, then arm), show the runs themselves; the filter is visible in the search box to clear.
DATA_RUNS = f"tags.{keys.VARIANT} IS NOT NULL"
BY_NAME = "orderByKey=" + quote(f"tags.`{keys.RUN_NAME}`") + "&orderByAsc=true"


def runs_table_url(base: str, experiment_id: str) -> str:
    return f"{base}/#/experiments/{experiment_id}/runs?{MODEL_TRAINING}&searchFilter={quote(DATA_RUNS)}&{BY_NAME}"


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{MODEL_TRAINING}"


def landing(uri: str, base: str, experiment: str | None = None) -> Landing:
    """Where to open the UI: `experiment` (default: the one whose newest run started last)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            names = sorted(e.name for e in client.search_experiments(max_results=1000))
            raise KeyError(f"no MLflow experiment named {experiment!r} at {uri}; found: {names}")
        experiment_id = found.experiment_id
    else:
        ids = [e.experiment_id for e in client.search_experiments(max_results=1000)]
        newest = client.search_runs(ids, order_by=["attributes.start_time DESC"], max_results=1) if ids else []
        if not newest:
            return Landing(base)
        experiment_id = newest[0].info.experiment_id
        experiment = client.get_experiment(experiment_id).name
    out = Landing(base, experiment, runs_table_url(base, experiment_id))
    parents = client.search_runs([experiment_id], f"tags.`{keys.SWEEP_ROLE}` = 'parent'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    if parents:
        out.sweep = run_url(base, experiment_id, parents[0].info.run_id)
        out.sweep_name = parents[0].data.tags.get(keys.SWEEP_NAME)
    return out


def describe(where: Landing, uri: str) -> str:
    lines = [f"MLflow UI for {uri}"]
    if where.runs is None:
        return "\n".join(lines + [f"  {where.base}   (no runs yet)"])
    lines.append(f"  runs of experiment {where.experiment!r}:  {where.runs}")
    if where.sweep:
        lines.append(f"  sweep {where.sweep_name!r} (parent run):  {where.sweep}")
    lines.append(f"  (the filter `{DATA_RUNS}` leaves out sweep parents, which have no metrics; "
                 f"tag columns: 'Columns' > Tags > variant, backbone, layer, lambda, source, seed)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# serving


class Stop(Exception):
    """A stop signal (SIGTERM, SIGHUP) or the launcher's parent gone: stop the server group."""


def _raise_stop(signum, frame):
    raise Stop(signal.Signals(signum).name)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> bool:
    """Poll `/health` until the server answers (it took ~35 s on a loaded 2-core box)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    return False


def serve(proc: subprocess.Popen, parent: int) -> int:
    """Wait for the server to exit, or for this launcher's parent to go (re-parented: a `make`
    or shell that died without signalling us)."""
    while proc.poll() is None:
        if os.getppid() != parent:
            raise Stop("parent exited")
        time.sleep(0.5)
    return proc.returncode


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store (default: MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")
    parser.add_argument("--experiment", default=None,
                        help="experiment to open (default: the one with the newest run)")
    parser.add_argument("--open", action="store_true", help="open the runs table in a web browser")
    parser.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the server to answer")


def run(args: argparse.Namespace) -> int:
    if not server_available():
        print("error: the MLflow UI needs the full `mlflow` package (the `ui` extra), not only mlflow-skinny.\n"
              f"Install it with:  {INSTALL_HINT}", file=sys.stderr)
        return 1
    from cameo_bench.tracking import default_tracking_uri, ensure_store

    uri = ensure_store(args.tracking_uri or default_tracking_uri())
    port = args.port or free_port()
    base = f"http://{HOST}:{port}"
    try:
        where = landing(uri, base, args.experiment)
    except KeyError as err:
        print(f"error: {err.args[0]}", file=sys.stderr)
        return 2
    parent = os.getppid()
    previous = {sig: signal.signal(sig, _raise_stop) for sig in STOP_SIGNALS}
    proc = start_group(server_command(uri, port))  # the server's leader dies with us even on SIGKILL
    print(describe(where, uri) + "\n(starting; Ctrl-C or SIGTERM stops it)", flush=True)
    try:
        if wait_ready(base, proc, args.timeout):
            print(f"ready: {where.runs or base}", flush=True)
            if args.open:
                import webbrowser

                webbrowser.open(where.runs or base)
        elif proc.poll() is None:
            print(f"warning: {base} has not answered after {args.timeout:.0f} s; still waiting", file=sys.stderr)
        return serve(proc, parent)
    except (KeyboardInterrupt, Stop) as why:
        print(f"stopping the MLflow UI ({type(why).__name__}{': ' + str(why) if str(why) else ''})", file=sys.stderr)
        return 0
    finally:
        for sig in STOP_SIGNALS:  # a second signal must not interrupt the cleanup
            signal.signal(sig, signal.SIG_IGN)
        stop_group(proc)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cameo_bench.tracking.ui", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
