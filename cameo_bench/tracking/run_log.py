"""A run's local record: params, buffered metrics (JSON lines) and text artifacts in its folder.

This is the tracker the engine always has; `mlflow_writer.MlflowTracker` mirrors the same calls to MLflow.
Metrics are buffered and written in batches, and a resumed run first drops whatever the killed run
logged after its last checkpoint, so the file of a resumed run equals that of an uninterrupted one.
"""
from __future__ import annotations

import json
import math
import pathlib
from typing import Any

from cameo_bench.tracking import keys


class RunLog:
    def __init__(self, folder: str | pathlib.Path, resume_step: int | None = None):
        self.folder = pathlib.Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.folder / keys.METRICS_FILE
        self._buffer: list[dict[str, Any]] = []
        if resume_step is not None and self.metrics_path.exists():
            kept = [line for line in self.metrics_path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            self.metrics_path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None and self.metrics_path.exists():
            self.metrics_path.unlink()

    def log_params(self, params: dict[str, Any]) -> None:
        (self.folder / keys.PARAMS_FILE).write_text(json.dumps(params, indent=1, sort_keys=True, default=str))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            value = float(value)
            self._buffer.append({"step": int(step), "key": key, "value": value if math.isfinite(value) else str(value)})

    def log_text(self, text: str, name: str) -> pathlib.Path:
        path = self.folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def flush(self) -> None:
        if not self._buffer:
            return
        with open(self.metrics_path, "a") as fh:
            for row in self._buffer:
                fh.write(json.dumps(row) + "\n")
        self._buffer.clear()

    def finish(self, status: str = "FINISHED", error: str | None = None) -> None:
        self.flush()
        payload = {"status": status, "error": error}
        (self.folder / keys.STATUS_FILE).write_text(json.dumps(payload, indent=1))


def read_metrics(folder: str | pathlib.Path) -> dict[str, list[tuple[int, float]]]:
    """`key -> [(step, value), ...]` from a run folder, in logging order, under current names
    (`keys.current_name`: a folder logged before a rename reads like a new one)."""
    history: dict[str, list[tuple[int, float]]] = {}
    path = pathlib.Path(folder) / keys.METRICS_FILE
    for line in path.read_text().splitlines() if path.exists() else []:
        row = json.loads(line)
        history.setdefault(keys.current_name(row["key"]), []).append((row["step"], float(row["value"])))
    return history
