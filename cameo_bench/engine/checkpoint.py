"""A run's checkpoint: what it holds, and atomic, weights-only files, so `--resume` continues bit-for-bit.

Everything that influences the next step is saved: model, EMA, CAMEO head, optimizer, LR schedule,
RNG states, data position and step. Files are written to a temporary name and renamed, so a kill
during the write never leaves a truncated checkpoint behind; loading uses `weights_only=True`.
The functions taking `run` read and fill a `cameo_bench.engine.build.Run`.
"""
from __future__ import annotations

import os
import pathlib
import random
from typing import Any

import numpy as np
import torch

from cameo_bench.engine import distributed
from cameo_bench.engine.signals import sigterm_deferred

LATEST = "latest.pt"
FOLDER = "checkpoints"  # inside the run folder


def latest_path(run_dir: str | os.PathLike) -> pathlib.Path:
    """`<run_dir>/checkpoints/latest.pt`: the checkpoint a run writes and `--resume` reads."""
    return pathlib.Path(run_dir) / FOLDER / LATEST


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": torch.tensor(random.getstate()[1], dtype=torch.int64),
        "python_pos": int(random.getstate()[2] if random.getstate()[2] is not None else -1),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    pos = state["python_pos"]
    random.setstate((3, tuple(int(x) for x in state["python"].tolist()), None if pos < 0 else pos))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: str | os.PathLike, payload: dict[str, Any]) -> pathlib.Path:
    """Write `payload` atomically: a temp file in the same folder, fsync, then rename."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with sigterm_deferred():  # a SIGTERM lands once the file is whole and in place
        with open(tmp, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    return path


def load(path: str | os.PathLike) -> dict[str, Any]:
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / LATEST
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a corrupt file must be named, not just fail deep inside pickle
        raise RuntimeError(f"checkpoint {path} is unreadable: {err}") from err


# ---------------------------------------------------------------------------------------------
# a run's state


def run_payload(run) -> dict[str, Any]:
    """Everything a resumed `run` needs, as tensors and plain values."""
    return {
        "model": run.model.state_dict(),
        "ema": run.ema.state_dict() if run.ema else None,
        "cameo_head": run.cameo_loss.state_dict() if run.cameo_loss else None,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "rng": rng_state(),
        "step": run.state.step,
        "world_size": run.dist.world,  # informational: a checkpoint resumes on any world size
        "data_position": run.state.step * run.exp.data.batch_size,
        "skipped_steps": run.state.skipped_steps,
        "train_seconds": run.state.train_seconds,
        "experiment": run.exp.flat_params(),
    }


def save_run(run) -> pathlib.Path | None:
    """Rank 0 writes `run.ckpt_path` (parameters are equal on every rank), the others wait; every
    rank must call it. Returns the path on rank 0, None elsewhere."""
    path = save(run.ckpt_path, run_payload(run)) if run.dist.is_main else None
    distributed.barrier()
    return path


def load_into(run, payload: dict[str, Any]) -> None:
    """Restore `run` (weights, optimizer, schedule, RNG, counters) from a `run_payload`."""
    run.model.load_state_dict(payload["model"])
    if run.ema is not None and payload.get("ema") is not None:
        run.ema.load_state_dict(payload["ema"])
    if run.cameo_loss is not None and payload.get("cameo_head") is not None:
        run.cameo_loss.load_state_dict(payload["cameo_head"])
    run.optimizer.load_state_dict(payload["optimizer"])
    run.scheduler.load_state_dict(payload["scheduler"])
    set_rng_state(payload["rng"])
    run.state.step = int(payload["step"])
    run.state.skipped_steps = int(payload.get("skipped_steps", 0))
    run.state.train_seconds = float(payload.get("train_seconds", 0.0))
