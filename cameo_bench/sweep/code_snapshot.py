"""A local sweep runs the code it started with, not the checkout as it is when each trial begins.

Studies run for hours, across sessions, while people edit the same checkout. The spawn pool's
workers import modules lazily, at a trial's first use, so without a copy a trial could mix modules
from before and after an edit. That was seen in the loss study: a commit during the sweep moved a
constant into `tracking.mlflow_writer`, and 16 queued trials failed on an ImportError. The git tags
each run logged also named the checkout's HEAD at the trial's start, not the code that ran.

So the sweep copies its two packages into the sweep's run folder before its workers start, puts the
copy first on their `sys.path`, and tags every trial with the commit (and dirty flag) of that moment.
Gin files are not copied: they are inputs like the data, and every run logs its operative config.
`gin` inside the copy links to the checkout's, so `include 'gin/...'` resolves as it does there.
Not covered: `workers = 0` (trials in the sweep's own process) and Slurm jobs, which import the
checkout they find when they start (submitit pickles the trial function by reference); run long
cluster sweeps from a clone of their own.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Iterator

PACKAGES = ("cameo_bench", "backbones")  # every importable package of the project (pyproject's packages)
SOURCE_ROOT = pathlib.Path(__file__).resolve().parents[2]  # the folder that holds PACKAGES


@dataclass(frozen=True)
class CodeSnapshot:
    root: pathlib.Path  # holds a copy of each package of PACKAGES; goes first on the workers' sys.path
    tags: dict[str, str]  # git.sha / git.dirty of the checkout when the copy was taken, and sweep.code


def take(folder: pathlib.Path, git: dict[str, str], source: pathlib.Path = SOURCE_ROOT) -> CodeSnapshot:
    """Copy PACKAGES from `source` into a new folder under `folder`; `git` = the checkout's git tags now."""
    from cameo_bench.tracking import keys

    root = pathlib.Path(folder) / f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    for package in PACKAGES:
        shutil.copytree(source / package, root / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if (source / "gin").is_dir():
        (root / "gin").symlink_to((source / "gin").resolve(), target_is_directory=True)
    return CodeSnapshot(root.resolve(), {**git, keys.SWEEP_CODE: str(root.resolve())})


@contextlib.contextmanager
def first_on_path(root: pathlib.Path | None) -> Iterator[None]:
    """While open, processes started from here (spawn copies sys.path) import the code under `root`."""
    if root is None:
        yield
        return
    entry = str(root)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        sys.path.remove(entry)
