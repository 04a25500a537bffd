"""`cameo-bench train GIN... [--gin_param 'a.b = c'] [--resume] [--experiment NAME] [--no-tracking]`.

Tracking is on by default: one MLflow run in the experiment `run_experiment.name` (or
`--experiment`), in `MLFLOW_TRACKING_URI` or `./mlflow.db`. `--resume` continues the MLflow run
whose id the run folder kept.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import sys
import threading
import traceback

from cameo_bench.engine.tracked_run import OperativeConfigLog, Terminated, on_sigterm, run_tags


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
    installed = threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    if installed:
        signal.signal(signal.SIGTERM, on_sigterm)
    try:
        code = _run(args)
    finally:
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # Under torchrun: barrier, destroy the process group, flush, os._exit (a gloo worker that
    # leaves through normal interpreter exit sometimes aborts). One process: returns `code`.
    from cameo_bench.engine import distributed
    return distributed.shutdown(code)


def _run(args: argparse.Namespace) -> int:
    from cameo_bench import config
    from cameo_bench.engine.trainer import ExperimentError, NonFiniteLossError, Trainer

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
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    tracker, trackers = None, []
    if enabled and int(os.environ.get("RANK", "0")) == 0:  # torchrun: rank 0 alone owns the MLflow run
        from cameo_bench import tracking
        tracker = tracking.MlflowTracker(experiment, exp.name, run_dir=pathlib.Path(exp.output_dir) / exp.name,
                                         uri=uri, tags=run_tags(exp, world_size), resume=args.resume)
        tracker.log_text(config.config_str(), "config/raw.gin")
        tracker.log_text(command, "config/command.json")
        # after the MLflow tracker, so that the run is always marked terminated first
        trackers = [tracker, OperativeConfigLog(tracker, config.operative_config)]
        print(f"MLflow run {tracker.run_id} in experiment {experiment!r} at {tracker.uri}", file=sys.stderr)

    try:
        trainer = Trainer(exp, resume=args.resume, trackers=trackers, device=args.device)
    except BaseException as err:
        if tracker is not None:
            tracker.finish("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED", f"{type(err).__name__}: {err}")
        if isinstance(err, (ExperimentError, KeyError, ValueError)):
            print(f"error: {err}", file=sys.stderr)
            return 2
        raise
    if trainer.log is not None:
        trainer.log.log_text(config.operative_config(), "config.gin")
        trainer.log.log_text(command, "command.json")
    if tracker is not None:
        from cameo_bench import tracking
        tags = {**tracking.environment_tags(str(trainer.device)), "checkpoint.path": str(trainer.ckpt_path.absolute()),
                "run_dir": str(trainer.run_dir.absolute())}
        if trainer.device.type == "cuda":
            import torch

            tags["gpu_type"] = torch.cuda.get_device_name(trainer.device)
        tracker.set_tags(tags)
        tracker.log_params({"cameo.layer_resolved": trainer.layer or "none"})
    try:
        metrics = trainer.fit()
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except Terminated as err:
        print(f"terminated ({err}); the last checkpoint is {trainer.ckpt_path}", file=sys.stderr)
        return 143
    except Exception:
        if tracker is not None:
            try:
                tracker.log_text(traceback.format_exc(), "error.txt")
            except Exception:  # noqa: BLE001 - the original error matters more
                pass
        raise
    if trainer.dist.is_main:
        print(json.dumps(metrics, indent=1, sort_keys=True))
    return 0
