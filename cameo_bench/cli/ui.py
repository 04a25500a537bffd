"""`cameo-bench ui [--experiment NAME] [--open]`: the MLflow UI, opened on the experiment's runs table.

The launcher itself is `cameo_bench.tracking.ui` (also `make ui`, `python -m cameo_bench.tracking.ui`);
this module only puts it on the command line.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from cameo_bench.tracking import ui

    ui.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from cameo_bench.tracking import ui

    return ui.run(args)
