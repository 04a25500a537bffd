"""`cameo-bench train GIN... [--gin_param 'a.b = c'] [--resume] [--experiment NAME] [--no-tracking]`.

Tracking is on by default: one MLflow run in the experiment `run_experiment.name` (or
`--experiment`), in `MLFLOW_TRACKING_URI` or `./mlflow.db`. `--resume` continues the MLflow run
whose id the run folder kept.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("gin_files", nargs="+", help="gin files, parsed in order (later ones win)")
    parser.add_argument("--gin_param", "--gin-param", action="append", default=[],
                        help="extra binding, e.g. --gin_param 'cameo.weight = 0.1' (repeatable)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from <output_dir>/<name>/checkpoints/latest.pt if it exists, "
                             "and the MLflow run of that folder")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--tracking", action=argparse.BooleanOptionalAction, default=None,
                        help="log to MLflow (default: on; --no-tracking keeps only the run folder)")
    parser.add_argument("--experiment", default=None, help="MLflow experiment (default: run_experiment.name)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store (default: MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")


def tracking_options(args: argparse.Namespace, exp) -> tuple[bool, str, str | None]:
    """(enabled, experiment, uri): the command line wins over gin's `tracking.*` section (read
    only if the experiment has one), which wins over `MLFLOW_TRACKING_URI` and the defaults."""
    spec = getattr(exp, "tracking", None)
    enabled = args.tracking if args.tracking is not None else bool(getattr(spec, "enabled", True))
    experiment = args.experiment or getattr(spec, "experiment", None) or exp.name
    uri = args.tracking_uri or getattr(spec, "uri", None) or None
    return enabled, experiment, uri


def run(args: argparse.Namespace) -> int:
    from cameo_bench.engine import distributed
    from cameo_bench.engine.signals import sigterm_as_interrupt

    with sigterm_as_interrupt():
        code = _run(args)
    # Under torchrun: barrier, destroy the process group, flush, os._exit (a gloo worker that
    # leaves through normal interpreter exit sometimes aborts). One process: returns `code`.
    return distributed.shutdown(code)


def _run(args: argparse.Namespace) -> int:
    from cameo_bench import config
    from cameo_bench.engine.build import ExperimentError
    from cameo_bench.engine.step import NonFiniteLossError
    from cameo_bench.engine.signals import Terminated
    from cameo_bench.engine.tracked_run import MlflowRun, Note, TrackedRun
    from cameo_bench.tracking import keys

    try:
        exp = config.parse(args.gin_files, args.gin_param)
    except config.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.no_progress:
        exp.train.progress = False
    command = json.dumps({"gin_files": [str(f) for f in args.gin_files], "gin_params": args.gin_param,
                          "resume": args.resume, "argv": sys.argv}, indent=1)
    enabled, experiment, uri = tracking_options(args, exp)
    # torchrun: rank 0 alone owns the MLflow run, named by `tracking.labels.run_label`
    mlflow = MlflowRun(experiment, uri=uri) if enabled and int(os.environ.get("RANK", "0")) == 0 else None
    tracked = TrackedRun(exp, resume=args.resume, device=args.device, mlflow=mlflow,
                         world_size=int(os.environ.get("WORLD_SIZE", "1")),
                         notes=[Note(keys.RUN_COMMAND, keys.ARTIFACT_COMMAND, command)])
    try:
        metrics = tracked.fit()
    except (ExperimentError, KeyError, ValueError) as err:
        if tracked.fitting:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except Terminated as err:
        print(f"terminated ({err}); the last checkpoint is {tracked.ckpt_path}", file=sys.stderr)
        return 143
    if tracked.run.dist.is_main:
        print(json.dumps(metrics, indent=1, sort_keys=True))
    return 0
