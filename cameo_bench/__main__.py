"""`cameo-bench` command line: one subcommand per job, each implemented in its own module.

Subcommand modules expose `add_arguments(parser)` and `run(args) -> int`; they are imported lazily
so `cameo-bench layers` does not pay for MLflow and `data` does not pay for the engine.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, help)
COMMANDS = {
    "train": ("cameo_bench.cli.train", "train one experiment from gin files"),
    "layers": ("cameo_bench.cli.layers", "list a backbone's attention layers (names for taps and sweeps)"),
    "eval": ("cameo_bench.cli.evaluate", "evaluate a trained run (NVS quality, attention correspondence)"),
    "sweep": ("cameo_bench.cli.sweep", "run a grid of experiments from a sweep gin file (local pool or Slurm)"),
    "report": ("cameo_bench.cli.report",
               "convergence report of an MLflow experiment: curves, speed-ups with bootstrap CIs, sweep tables"),
    "archive": ("cameo_bench.cli.archive",
                "export an experiment's runs to a committed file, or import such a file into the store"),
    "data": ("cameo_bench.cli.data", "write synthetic scenes, convert real datasets to scene folders, check them"),
    "ui": ("cameo_bench.cli.ui", "the MLflow UI on 127.0.0.1, opened on an experiment's runs table (needs the ui extra)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cameo-bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
