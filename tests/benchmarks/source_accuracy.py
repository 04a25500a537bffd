"""How right each correspondence source's targets are, against exact depth reprojection, on a study's scenes.

A script, not a test (reports/sources/README.md). Why: the source study ranks sources by what
they do to training, and a ranking needs its cause measured. In the issue 13 regime sparse SIFT
matches cost 0.39 dB where the old regime saw them help; this says how often their targets pick
another token than the true one. It reads the sweep file's arms (one per distinct source
configuration, seeds ignored), renders the first `--scenes` training scenes of each arm's data
section, and scores each arm's targets against `depth`'s on the supervised grid:

    OMP_NUM_THREADS=1 .venv/bin/python tests/benchmarks/source_accuracy.py [gin/sweeps/sources.gin] [--scenes 32] [--stride 4]

Columns, over (query token, other view) pairs:
- `supervised`: the fraction with a target (depth's own is the fraction visible in the other view).
- `visible`: of the supervised pairs, the fraction that depth also supervises (in frame, not occluded).
- `exact` / `within 1`: of the pairs both supervise, the fraction whose target token (the
  heaviest, for soft targets) is depth's, or within one token of it (Chebyshev).
- `mass within 1`: the target weight on tokens within one token of depth's (soft targets spread it).
`--stride` is the supervised layer's pixels per token (4: the tiny DiT's patch, every block).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch

REPO = pathlib.Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cameo_bench import config  # noqa: E402
from cameo_bench.correspondence import compute_targets  # noqa: E402
from cameo_bench.data.batch import collate  # noqa: E402
from cameo_bench.data.loading import build_datasets  # noqa: E402
from cameo_bench.sweep import grid  # noqa: E402


def arms(sweep_file: str) -> list[tuple[str, str, dict, object]]:
    """(label, source, its options, data spec) per distinct CAMEO source configuration of the sweep."""
    p = grid.plan(grid.load(sweep_file), check=False)
    seen, out = set(), []
    for trial in p.trials:
        exp = config.parse(p.gin_files, p.trial_bindings(trial))
        if not exp.cameo.enabled:
            continue
        key = (exp.cameo.source, json.dumps(exp.cameo.source_options, sort_keys=True))
        if key in seen:
            continue
        seen.add(key)
        label = exp.cameo.source + (f" {exp.cameo.source_options}" if exp.cameo.source_options else "")
        out.append((label, exp.cameo.source, dict(exp.cameo.source_options), exp.data))
    return out


def score(targets, truth, w: int) -> dict[str, float]:
    """The columns above for one source's targets against depth's, on grids of width `w`."""
    B, N, V = truth.valid.shape
    pairs = B * N * (V - 1)  # every (query, other view) pair: `valid` is False on a query's own view
    both = targets.valid & truth.valid  # [B, N, V]
    top = targets.weight.argmax(-1, keepdim=True)  # [B, N, V, 1]
    got = targets.idx.gather(-1, top)[..., 0][both]  # [M] heaviest target token
    true = truth.idx[..., 0][both]  # [M]
    cheb = torch.maximum((got % w - true % w).abs(), (got // w - true // w).abs())
    near = torch.maximum((targets.idx % w - truth.idx[..., :1] % w).abs(),
                         (targets.idx // w - truth.idx[..., :1] // w).abs()) <= 1  # [B, N, V, k]
    mass = (targets.weight * near).sum(-1)[both]  # [M]
    n = max(int(both.sum()), 1)
    return {"supervised": float(targets.valid.sum()) / pairs,
            "visible": float(both.sum() / targets.valid.sum().clamp(min=1)),
            "exact": float((cheb == 0).sum()) / n, "within 1": float((cheb <= 1).sum()) / n,
            "mass within 1": float(mass.sum()) / n, "pairs": int(both.sum())}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", nargs="?", default=str(REPO / "gin/sweeps/sources.gin"))
    parser.add_argument("--scenes", type=int, default=32)
    parser.add_argument("--stride", type=int, default=4)
    args = parser.parse_args(argv)
    rows = []
    for label, source, options, data in arms(args.sweep):
        train, _ = build_datasets(data)
        batch = collate([train[i] for i in range(min(args.scenes, len(train)))])
        V, (H, W) = batch["image"].shape[1], batch["image"].shape[-2:]
        size = (V, H // args.stride, W // args.stride)
        truth = compute_targets("depth", batch, size, args.stride)
        targets = compute_targets(source, batch, size, args.stride, **options)
        rows.append({"source": label, **score(targets, truth, size[2])})
    columns = ["supervised", "visible", "exact", "within 1", "mass within 1"]
    print(f"{args.scenes} training scenes, {args.stride} px per token; targets scored against depth reprojection\n")
    print("| source | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for row in rows:
        print(f"| {row['source']} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")
    return rows


if __name__ == "__main__":
    main()
