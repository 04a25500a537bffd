"""Where a CAMEO training step's extra time goes: targets, query selection, the loss's planning, the loss itself, the backward.

A script, not a test (reports/benchmarks/README.md, "Where the time goes"). It builds the
quickstart configuration (gin/experiments/quickstart.gin at its batch 8, or `--batch 4`, the size issue 14's bar was set at:
3 views, 32 px, mean head, every query) for one backbone twice, baseline and CAMEO, steps them in
turn, and times the CAMEO step's parts in CPU seconds (one thread; medians over the rounds):

    OMP_NUM_THREADS=1 .venv/bin/python tests/benchmarks/profile_cameo_step.py dit [--impl dense] [--rounds 20]

`loss` is CameoLoss.forward, which on both paths also computes the loss's gradients; `plan` is
its planning inside it (query layout, sparse targets, term counts); `forward` / `backward` are
the rest of the step's forward (the tap's gather) and the extra of the backward pass against the
baseline's (the loss's gradients entering the backbone).
"""
from __future__ import annotations

import argparse
import functools
import pathlib
import statistics
import sys
import tempfile
import time
from collections import defaultdict

import torch

REPO = pathlib.Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import quickstart_arms  # noqa: E402

BACKBONES = quickstart_arms.quickstart_backbones()  # gin/sweeps/quickstart.gin's backbone axis


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("backbone", choices=sorted(BACKBONES))
    parser.add_argument("--impl", default="auto", help="cameo.impl of the CAMEO arm")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="data.batch_size (the quickstart's: 8)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from cameo_bench import config
    from cameo_bench.engine import build
    from cameo_bench.engine import step as step_module
    from cameo_bench.objectives import alignment

    times: dict[str, list[float]] = defaultdict(list)
    arm = ["baseline"]

    def timed(name, fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            start = time.process_time()
            out = fn(*a, **k)
            times[f"{arm[0]}.{name}"][-1] += time.process_time() - start
            return out
        return wrapper

    step_module.step_targets = timed("targets", step_module.step_targets)
    step_module.select_queries = timed("select_queries", step_module.select_queries)
    build.StepModule.forward = timed("forward", build.StepModule.forward)
    alignment.CameoLoss.forward = timed("loss", alignment.CameoLoss.forward)
    alignment.CameoLoss._plan = timed("plan", alignment.CameoLoss._plan)
    torch.Tensor.backward = timed("backward", torch.Tensor.backward)
    parts = ("targets", "select_queries", "forward", "loss", "plan", "backward", "step")

    def make(weight: float):
        exp = config.parse(["gin/experiments/quickstart.gin"], BACKBONES[args.backbone] + [
            f"data.batch_size = {args.batch}", "data.num_scenes = 16", "train.progress = False", "train.checkpoint_every = 0",
            "eval.every = 0", "eval.at_start = False", f"cameo.weight = {weight}", f"cameo.impl = '{args.impl}'",
            f"run_experiment.output_dir = '{tempfile.mkdtemp()}'"])
        return build.build_run(exp)

    runs = {"baseline": make(0.0), "cameo": make(0.5)}
    for step in range(args.rounds + 2):
        for name, run in runs.items():
            arm[0] = name
            for part in parts:
                times[f"{name}.{part}"].append(0.0)
            start = time.process_time()
            step_module.train_step(run, step)
            times[f"{name}.step"][-1] = time.process_time() - start
    ms = {key: statistics.median(values[2:]) * 1e3 for key, values in times.items()}
    report = dict(
        backbone=args.backbone, impl=args.impl, baseline_step_ms=ms["baseline.step"], cameo_step_ms=ms["cameo.step"],
        ratio=ms["cameo.step"] / ms["baseline.step"], targets_ms=ms["cameo.targets"],
        select_queries_ms=ms["cameo.select_queries"], plan_ms=ms["cameo.plan"],
        loss_incl_gradients_ms=ms["cameo.loss"],
        other_forward_ms=ms["cameo.forward"] - ms["cameo.loss"] - ms["baseline.forward"],
        backward_extra_ms=ms["cameo.backward"] - ms["baseline.backward"])
    print("  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in report.items()))
    return report


if __name__ == "__main__":
    main()
