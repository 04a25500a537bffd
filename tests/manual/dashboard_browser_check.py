"""Manual check of the MLflow dashboard in a real browser: a micro quickstart-like sweep, `cameo-bench ui`, Chromium screenshots.

Not collected by pytest (no `test_` prefix) and not run in CI: it needs the `ui` extra and Debian's
`chromium` (`apt-get install -y chromium`), and takes ~3-5 min on a shared 2-core box.

    .venv/bin/python tests/manual/dashboard_browser_check.py [--out DIR] [--keep]

What it does: trains the quickstart's four arms (mv_dit / mv_unet micro, lambda 0 / 0.5) for a few
steps as one sweep into a fresh sqlite store, starts `cameo-bench ui` on it, takes headless screenshots
of the addresses it prints (runs table, charts with the images by step, the sweep's parent run), then
sends the launcher SIGTERM and checks that the port is closed and no server process is left.
Look at the PNGs in DIR (default: a temporary folder, printed at the end).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
SWEEP = """
sweep.name = 'micro_quickstart'
sweep.base = ['gin/experiments/smoke.gin']
sweep.fixed = ['train.steps = 8', 'train.log_every = 2', 'eval.every = 4', 'eval.at_start = True',
               'train.checkpoint_every = 8', 'eval.lpips = True']
sweep.axes = {
    'backbone': [
        {'backbone.name': 'mv_dit', 'backbone.preset': 'micro', 'cameo.layer': 'depth:0.5'},
        {'backbone.name': 'mv_unet', 'backbone.preset': 'micro', 'cameo.layer': 'up.01.attn.00'},
    ],
    'cameo.weight': [0.0, 0.5],
}
sweep.executor = 'local'
sweep.workers = 2
sweep.output_dir = '{runs}'
"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    sys.exit("chromium not found: apt-get install -y chromium")


class Browser:
    """Headless Chromium driven over its DevTools protocol (aiohttp comes with the `ui` extra): the
    plain `--screenshot --virtual-time-budget` never settled on MLflow's polling SPA on a loaded box,
    while a real-time wait before `Page.captureScreenshot` does. A fresh profile: MLflow remembers
    the last workflow mode in localStorage, and a new user has none."""

    def __init__(self, profile: pathlib.Path):
        shutil.rmtree(profile, ignore_errors=True)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.proc = subprocess.Popen(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--no-first-run", f"--user-data-dir={profile}", f"--remote-debugging-port={self.port}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def _page(self, session, url: str, path: pathlib.Path, size: tuple[int, int], wait: float, script: str,
                    then: str | None):
        import asyncio
        import base64
        import json

        for _ in range(120):
            try:
                async with session.put(f"http://127.0.0.1:{self.port}/json/new?about:blank") as r:
                    target = await r.json()
                break
            except Exception:  # noqa: BLE001 - not listening yet
                await asyncio.sleep(0.5)
        async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            counter = iter(range(1, 10**6))

            async def call(method, **params):
                msg_id = next(counter)
                await ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params}))
                async for msg in ws:
                    data = json.loads(msg.data)
                    if data.get("id") == msg_id:
                        return data.get("result", {})

            await call("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1], deviceScaleFactor=1,
                       mobile=False)
            await call("Page.navigate", url=url)
            await asyncio.sleep(wait)
            if then:  # e.g. click a button or scroll to a section, then let the page settle
                await call("Runtime.evaluate", expression=then, returnByValue=True)
                await asyncio.sleep(8)
            text = (await call("Runtime.evaluate", expression=script, returnByValue=True))["result"].get("value")
            shot = await call("Page.captureScreenshot", format="png")
            path.write_bytes(base64.b64decode(shot["data"]))
            await call("Page.close")
            return text

    def shoot(self, url: str, path: pathlib.Path, size=(1600, 1000), wait: float = 45.0,
              script: str = "document.body.innerText", then: str | None = None) -> str:
        """Open `url`, wait `wait` real seconds, save a PNG; returns `script`'s value (the page text)."""
        import asyncio

        import aiohttp

        async def go():
            async with aiohttp.ClientSession() as session:
                return await self._page(session, url, path, size, wait, script, then)

        text = asyncio.run(go())
        print(f"  {path.name}: {url}")
        return text or ""

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def click(text: str) -> str:
    """JS: click the first button whose text is `text`."""
    return (f"[...document.querySelectorAll('button')].find(b => b.innerText.trim().startsWith({text!r}))?.click()")


def scroll_to(prefix: str) -> str:
    """JS: scroll the first chart-section title starting with `prefix` into view."""
    return ("[...document.querySelectorAll('*')].find(e => e.children.length === 0 && "
            f"e.textContent.trim().startsWith({prefix!r}))?.scrollIntoView()")


def compare_url(runs_url: str, out: pathlib.Path) -> str:
    """The compare page of the experiment's four runs (what the UI's Compare button opens)."""
    import json
    import urllib.parse

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("micro_quickstart").experiment_id
    ids = [r.info.run_id for r in client.search_runs([experiment], "tags.variant IS NOT NULL")]
    base = runs_url.split("/#/")[0]
    return (f"{base}/#/compare-runs?runs={urllib.parse.quote(json.dumps(ids))}"
            f"&experiments={urllib.parse.quote(json.dumps([experiment]))}")


def keys_diag() -> str:
    sys.path.insert(0, str(REPO))
    from cameo_bench.tracking import keys

    return keys.DIAG


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="folder for the store and the screenshots")
    parser.add_argument("--keep", action="store_true", help="leave the UI running (prints its pid)")
    parser.add_argument("--skip-sweep", action="store_true", help="reuse the store in --out")
    args = parser.parse_args()
    out = pathlib.Path(args.out or tempfile.mkdtemp(prefix="dashboard-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}", "OMP_NUM_THREADS": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    py = sys.executable
    if not args.skip_sweep:
        (out / "sweep.gin").write_text(textwrap.dedent(SWEEP).replace("{runs}", str(out / "runs")))
        tic = time.perf_counter()
        subprocess.run([py, "-m", "cameo_bench", "sweep", str(out / "sweep.gin"), "--summary"],
                       check=True, env=env, cwd=REPO)
        print(f"sweep: {time.perf_counter() - tic:.0f} s")
    ui = subprocess.Popen([py, "-m", "cameo_bench", "ui", "--experiment", "micro_quickstart"], env=env, cwd=REPO,
                          stdout=subprocess.PIPE, text=True)
    lines = []
    for line in ui.stdout:
        print("ui>", line.rstrip())
        lines.append(line)
        if line.startswith("ready:"):
            break
    text = "".join(lines)
    runs = re.search(r"runs of experiment .*?:\s+(\S+)", text)[1]
    sweep = re.search(r"\(parent run\):\s+(\S+)", text)[1]
    port = int(re.search(r"127\.0\.0\.1:(\d+)", runs)[1])
    charts_url = runs.replace("?", "?compareRunsMode=CHART&", 1)
    shots = [  # (file, url, window size, JS to run before the screenshot)
        ("1_runs_table", runs, (1600, 900), None),
        ("2_columns_menu", runs, (1600, 900), click("Columns")),
        ("3_charts_top", charts_url, (1600, 1800), None),
        ("4_charts_figures", charts_url, (1600, 1400), scroll_to("figures")),
        ("5_charts_diagnostics", charts_url, (1600, 1400), scroll_to(keys_diag() + "attn")),
        ("6_sweep_parent_run", sweep, (1600, 900), None),
        ("7_compare_page", compare_url(runs, out), (1600, 1400), scroll_to("samples.png")),
    ]
    browser = Browser(out / "chromium-profile")
    texts = {}
    try:
        for name, url, size, then in shots:
            texts[name] = browser.shoot(url, out / f"{name}.png", size=size, then=then)
            (out / f"{name}.txt").write_text(texts[name])
    finally:
        browser.close()
    names = re.findall(r"mv_\w+ micro · [^\n]+", texts["1_runs_table"])
    print(f"run names in the table: {sorted(set(names))}")
    if args.keep:
        print(f"UI left running: pid {ui.pid}, {runs}")
        return 0
    ui.send_signal(signal.SIGTERM)
    code = ui.wait(timeout=60)
    time.sleep(1)
    print(f"launcher exited {code}; port {port} open: {port_open(port)}; screenshots in {out}")
    return 0 if not port_open(port) else 1


if __name__ == "__main__":
    sys.exit(main())
