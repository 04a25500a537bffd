"""Atomic, weights-only checkpoints that let `--resume` continue bit-for-bit.

Everything that influences the next step is saved: model, EMA, optimizer, LR schedule, RNG states,
data position and step. Files are written to a temporary name and renamed, so a kill during the
write never leaves a truncated checkpoint behind; loading uses `weights_only=True`.
"""
from __future__ import annotations

import os
import pathlib
import random
from typing import Any

import numpy as np
import torch

LATEST = "latest.pt"


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
