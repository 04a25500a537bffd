"""`cameo-bench train GIN... [--gin_param 'a.b = c'] [--resume]`."""
from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("gin_files", nargs="+", help="gin files, parsed in order (later ones win)")
    parser.add_argument("--gin_param", "--gin-param", action="append", default=[],
                        help="extra binding, e.g. --gin_param 'cameo.weight = 0.1' (repeatable)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from <output_dir>/<name>/checkpoints/latest.pt if it exists")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from cameo_bench import config
    from cameo_bench.train import ExperimentError, NonFiniteLossError, Trainer

    try:
        exp = config.parse(args.gin_files, args.gin_param)
    except config.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.no_progress:
        exp.train.progress = False
    try:
        trainer = Trainer(exp, resume=args.resume, device=args.device)
    except (ExperimentError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if trainer.log is not None:
        trainer.log.log_text(config.operative_config(), "config.gin")
        trainer.log.log_text(json.dumps({"gin_files": [str(f) for f in args.gin_files],
                                         "gin_params": args.gin_param}, indent=1), "command.json")
    try:
        metrics = trainer.fit()
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    print(json.dumps(metrics, indent=1, sort_keys=True))
    return 0
