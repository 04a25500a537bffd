"""`cameo-bench report --experiment NAME`: convergence report of an MLflow experiment (one sweep)."""
from __future__ import annotations

import argparse
import os
import re
import shlex
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiment", default=None,
                        help="MLflow experiment name (a sweep's experiment); required unless --archive names it")
    parser.add_argument("--archive", default=None,
                        help="read the runs from this file of `cameo-bench archive export` instead of the store "
                             "(it keeps no figures: attention figures are left out)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory)")
    parser.add_argument("--out", default="reports", help="parent folder; the report goes to OUT/NAME/")
    parser.add_argument("--name", default=None, help="report folder name (default: the experiment name)")
    parser.add_argument("--fractions", default="0.5,0.75,0.9,1.0",
                        help="speed-up thresholds as fractions of the way from the baseline's first to final value")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the confidence intervals")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (the report is deterministic given it)")
    parser.add_argument("--no-plots", action="store_true", help="tables only (no matplotlib figures)")
    parser.add_argument("--x", default="steps", choices=("steps", "flops", "seconds"),
                        help="draw curves (and measure speed-ups) against training steps, training FLOPs "
                             "(step x compute/train_flops_per_step) or training seconds (time/train_seconds)")
    parser.add_argument("--include-running", action="store_true",
                        help="also use runs still RUNNING (partial curves; compared on their common steps)")


def regenerate_command(args: argparse.Namespace) -> str:
    """The command line that rebuilds this report, with only the options that were changed."""
    parts = ["cameo-bench", "report"] + ([] if args.archive else ["--experiment", args.experiment])
    defaults = {"archive": None, "tracking_uri": None, "out": "reports", "name": None, "fractions": "0.5,0.75,0.9,1.0",
                "bootstrap": 2000, "seed": 0, "include_running": False, "no_plots": False, "x": "steps"}
    for key, default in defaults.items():
        value = getattr(args, key)
        if value != default:
            flag = "--" + key.replace("_", "-")
            parts += [flag] if value is True else [flag, str(value)]
    return shlex.join(parts)


def _prefixes(load_runs, x: str) -> tuple[str, ...]:
    """`load_runs`' own metric prefixes plus what `--x` reads (FLOPs per step, the training clock)."""
    import inspect

    from cameo_bench.report.xaxis import metric_prefixes

    return tuple(inspect.signature(load_runs).parameters["metric_prefixes"].default) + metric_prefixes(x)


def _archive_fetch(texts: dict[tuple[str, str], str]):
    """`fetch` for `build_report` from an archive: the text artifacts it kept, no figures."""
    import pathlib

    def fetch(run, path, dst):
        text = texts.get((run.run_id, path))
        if text is None:
            return None
        pathlib.Path(dst).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(dst).write_text(text)
        return pathlib.Path(dst)
    return fetch


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per fetched figure is noise
    from cameo_bench.report import build_report
    from cameo_bench.tracking import default_tracking_uri, fetch_artifact, load_runs

    try:
        fractions = tuple(float(f) for f in args.fractions.split(","))
    except ValueError:
        print(f"error: --fractions {args.fractions!r} is not a comma-separated list of numbers", file=sys.stderr)
        return 2
    uri = args.tracking_uri or default_tracking_uri()
    fetch = lambda run, path, dst: fetch_artifact(run.run_id, path, dst, uri)  # noqa: E731
    if args.archive:
        from cameo_bench.tracking import read_archive

        try:
            experiment, runs, texts = read_archive(args.archive)
        except (OSError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        if args.experiment not in (None, experiment):
            print(f"error: {args.archive} holds experiment {experiment!r}, not {args.experiment!r}", file=sys.stderr)
            return 2
        args.experiment, fetch = experiment, _archive_fetch(texts)
    elif args.experiment is None:
        print("error: name the runs: --experiment NAME (from the store) or --archive FILE", file=sys.stderr)
        return 2
    else:
        try:
            runs = load_runs(args.experiment, uri, metric_prefixes=_prefixes(load_runs, args.x))
        except KeyError as err:
            print(f"error: {err.args[0]}", file=sys.stderr)
            return 2
    name = args.name or re.sub(r"[^A-Za-z0-9._-]+", "_", args.experiment)
    statuses = ("FINISHED", "RUNNING") if args.include_running else ("FINISHED",)
    try:
        report = build_report(runs, f"{args.out}/{name}", experiment=args.experiment, command=regenerate_command(args),
                              fractions=fractions, n_boot=args.bootstrap, seed=args.seed, statuses=statuses,
                              source=args.archive or args.tracking_uri, draw=not args.no_plots, x=args.x,
                              fetch=fetch)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {report.out_dir / 'report.md'} ({len(report.files)} files, {len(report.comparisons)} comparisons)")
    return 0
