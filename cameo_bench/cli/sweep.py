"""The `cameo-bench sweep SWEEP.gin [--dry-run] [--executor local|slurm] [--workers N]` command.

Exit codes: 0 all trials finished (or were already), 1 some trials failed (listed at the end),
2 the sweep file is invalid.
"""
from __future__ import annotations

import argparse
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep_file", help="sweep gin file (see gin/sweeps/)")
    parser.add_argument("--dry-run", action="store_true", help="print the trials and their count, run nothing")
    parser.add_argument("--executor", choices=("local", "slurm"), default=None,
                        help="override sweep.executor (local: process pool; slurm: submitit)")
    parser.add_argument("--workers", type=int, default=None,
                        help="local pool size (override sweep.workers); 0 = one by one in this process")
    parser.add_argument("--cluster", choices=("slurm", "local", "debug"), default=None,
                        help="submitit backend for --executor slurm (default: detected); local/debug run here")
    parser.add_argument("--fixed", action="append", default=[], metavar="BINDING",
                        help="extra binding for every trial, e.g. --fixed 'train.steps = 20' (changes trial ids)")
    parser.add_argument("--gin_param", "--gin-param", action="append", default=[], metavar="BINDING",
                        help="override a sweep.* value, e.g. --gin_param 'sweep.workers = 4'")
    parser.add_argument("--summary", action="store_true",
                        help="print a side-by-side table of every trial's last evaluation at the end")
    parser.add_argument("--tracking-uri", default=None, help="MLflow store (default: MLFLOW_TRACKING_URI or ./mlflow.db)")
    parser.add_argument("--archive", default=None, metavar="FILE",
                        help="rewrite FILE (e.g. reports/NAME/runs.json.gz) with the experiment's runs after every "
                             "trial: `cameo-bench archive` reads it back")


def run(args: argparse.Namespace) -> int:
    from cameo_bench import sweep
    try:
        spec = sweep.load(args.sweep_file, args.gin_param)
        spec.fixed = list(spec.fixed) + list(args.fixed)
        plan = sweep.plan(spec)
    except sweep.SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(sweep.describe(plan))
        return 0
    if args.workers is not None and args.workers < 0:
        print("error: --workers must be >= 0", file=sys.stderr)
        return 2
    slurm = {"cluster": args.cluster} if args.cluster else None
    if args.archive:
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # the archive reads each run's trial list
    from cameo_bench.engine.signals import Terminated, sigterm_as_interrupt

    try:
        with sigterm_as_interrupt():  # `kill` of the sweep stops its trials too, each KILLED and resumable
            results = sweep.run(plan, executor=args.executor, workers=args.workers, uri=args.tracking_uri, slurm=slurm,
                                archive=args.archive)
    except KeyboardInterrupt as err:  # the runner has marked every started trial KILLED by now
        why = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
        print(f"sweep {plan.spec.name!r} {why}: started trials are KILLED and resume from their last checkpoint; "
              f"run the same command again to go on", file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130
    if args.summary:
        from cameo_bench.report.summary import summary_table

        print(summary_table(plan))
    report = sweep.failure_report(plan, results)
    if report:
        print(report, file=sys.stderr)
        return 1
    return 0
