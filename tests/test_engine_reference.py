"""The engine redesign changed no result: runs with the same gin files as before it reproduce the
losses, evaluation metrics and parameters recorded by the pre-redesign engine (commit 59a3064,
`tests/fixtures/make_engine_reference.py`).

Metrics are compared to a relative 1e-5: float32 training rounds differently on different CPUs even
with the same torch and the same reported CPU capability (a new machine of 2026-12-07, capability
as recorded, moved metrics by 1.4e-7 relative after training), while any change of the algorithm
moves them by orders of magnitude more. The fixture's parameter hash is therefore not asserted (it
held bit for bit only on the machines of its day). Where the kernels are known to differ (another
torch or capability), the tolerance is 1e-4.
"""
from __future__ import annotations

import json
import math
import pathlib

import pytest
import torch

from cameo_bench import config
from cameo_bench.tracking import keys
from cameo_bench.tracking.run_log import read_metrics

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "engine_reference_pre_redesign.json"
REFERENCE = json.loads(FIXTURE.read_text())
CASE_FILES = {
    "dit_micro_cameo": ["gin/experiments/smoke.gin"],
    "unet_micro_cameo_linear": ["gin/experiments/smoke.gin", "gin/backbones/mv_unet_micro.gin"],
    "dit_tiny_quickstart": ["tests/fixtures/quickstart_pre_issue13.gin"],
    "dit_micro_baseline_ema": ["gin/experiments/smoke.gin"],
}
SAME_KERNELS = (REFERENCE["torch"] == torch.__version__
                and REFERENCE["cpu_capability"] == torch.backends.cpu.get_cpu_capability())


def run_case(name: str, tmp_path: pathlib.Path, extra: tuple[str, ...] = ()):
    from cameo_bench.engine.build import build_run
    from cameo_bench.engine.loop import fit

    case = REFERENCE["cases"][name]
    exp = config.parse(CASE_FILES[name], case["bindings"] + list(extra) + [
        f"run_experiment.output_dir = '{tmp_path}'", f"run_experiment.name = '{name}'"])
    exp.train.progress = False
    run = build_run(exp)
    fit(run)
    return run, read_metrics(tmp_path / name)


def compare(name: str, history, *, exact: bool) -> None:
    expected = REFERENCE["cases"][name]
    for old_name, values in expected["metrics"].items():
        key = keys.current_name(old_name)  # the fixture has the names of its day (`attn/...`)
        assert key in history, f"{key} no longer logged"
        got = history[key]
        assert [s for s, _ in got] == [s for s, _ in values], key
        for (_, a), (_, b) in zip(got, values):
            b = float(b)
            if math.isnan(b):
                assert math.isnan(a), (key, a, b)
            else:
                assert a == pytest.approx(b, rel=1e-5 if exact else 1e-4, abs=1e-7 if exact else 1e-6), (key, a, b)


# The pre-redesign engine computed the CAMEO loss with what is now `cameo.impl = 'dense'`; the
# faster default path ('sparse', issue 14) sums the same terms in another order.
SAME_ALGORITHM = ("cameo.impl = 'dense'",)


@pytest.mark.parametrize("name", sorted(REFERENCE["cases"]))
def test_same_gin_gives_the_pre_redesign_run(name, tmp_path):
    torch.set_num_threads(1)
    _, history = run_case(name, tmp_path, SAME_ALGORITHM)
    compare(name, history, exact=SAME_KERNELS)


@pytest.mark.parametrize("name", ["dit_micro_cameo", "unet_micro_cameo_linear"])
def test_the_default_loss_path_agrees_with_the_pre_redesign_run_to_rounding(name, tmp_path):
    """Measured: the sparse path moves the reference numbers by at most 4.4e-7 relative."""
    torch.set_num_threads(1)
    _, history = run_case(name, tmp_path)
    compare(name, history, exact=False)
