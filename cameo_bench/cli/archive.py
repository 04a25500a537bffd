"""`cameo-bench archive export|import`: a study's runs as a committed file, and back into a store.

The store (`mlflow.db`) is never committed; the archive (`reports/<study>/runs.json.gz`) is, so a
fresh checkout can rebuild the report (`cameo-bench report --archive FILE`) and resume or reuse the
study's trials after `cameo-bench archive import FILE`. See `cameo_bench.tracking.run_archive`.
"""
from __future__ import annotations

import argparse
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    export = sub.add_parser("export", help="write every run of an experiment to a gzipped JSON file")
    export.add_argument("--experiment", required=True, help="MLflow experiment name (a sweep's experiment)")
    export.add_argument("--out", default=None, help="the file (default: reports/EXPERIMENT/runs.json.gz)")
    imp = sub.add_parser("import", help="recreate an archive's runs in the store (runs already there are skipped)")
    imp.add_argument("file", help="a file written by `cameo-bench archive export`")
    for p in (export, imp):
        p.add_argument("--tracking-uri", default=None,
                       help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory)")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per run's trial list is noise
    from cameo_bench.tracking import ensure_store, export_experiment, import_archive

    if args.action == "export":
        out = args.out or f"reports/{args.experiment}/runs.json.gz"
        try:
            count = export_experiment(args.experiment, out, args.tracking_uri)
        except KeyError as err:
            print(f"error: {err.args[0]}", file=sys.stderr)
            return 2
        print(f"wrote {out}: {count} runs of experiment {args.experiment!r}")
        return 0
    try:
        uri = ensure_store(args.tracking_uri)
        imported, skipped = import_archive(args.file, uri)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"imported {imported} runs from {args.file} ({skipped} already in the store)")
    return 0
