"""`make ui`: the MLflow UI for this project's store, on 127.0.0.1 and a free port.

The UI needs the full `mlflow` package (the `ui` extra: Flask, uvicorn, ~800 MB); training only
needs mlflow-skinny. Bound to the loopback because the UI has no authentication: reach it from
another machine through an SSH tunnel (`ssh -L PORT:127.0.0.1:PORT host`).
"""
from __future__ import annotations

import argparse
import importlib.util
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from importlib import metadata

HOST = "127.0.0.1"
INSTALL_HINT = "pip install -e '.[ui]'   (or: make ui, which installs it)"


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cameo_bench.tracking.ui", description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store (default: MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")
    parser.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the server to answer")
    args = parser.parse_args(argv)
    if not server_available():
        print("error: the MLflow UI needs the full `mlflow` package (the `ui` extra), not only mlflow-skinny.\n"
              f"Install it with:  {INSTALL_HINT}", file=sys.stderr)
        return 1
    from cameo_bench.tracking import default_tracking_uri, ensure_store

    uri = ensure_store(args.tracking_uri or default_tracking_uri())
    port = args.port or free_port()
    url = f"http://{HOST}:{port}"
    proc = subprocess.Popen(server_command(uri, port))
    print(f"MLflow UI for {uri}\n  {url}\n(starting; Ctrl-C stops it)", flush=True)
    try:
        if wait_ready(url, proc, args.timeout):
            print(f"ready: {url}", flush=True)
        elif proc.poll() is None:
            print(f"warning: {url} has not answered after {args.timeout:.0f} s; still waiting", file=sys.stderr)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
