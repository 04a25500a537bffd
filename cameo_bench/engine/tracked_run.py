"""What one tracked training process needs besides the Trainer, shared by `cameo-bench train` and
sweep trials: SIGTERM as an interrupt, the run's search tags, and logging gin's operative config
once it is known. Kept out of the CLI so that the sweep executors do not import a command module.
"""
from __future__ import annotations

import sys


class Terminated(KeyboardInterrupt):
    """SIGTERM (Slurm's time limit, a scheduler's preemption) as an interrupt, so the run is
    flushed and marked KILLED instead of vanishing while RUNNING."""


def on_sigterm(signum, frame):
    raise Terminated(f"signal {signum}")


def run_tags(exp, world_size: int) -> dict[str, str]:
    """Tags to slice runs by in MLflow's search (params hold the full configuration)."""
    return {
        "variant": "cameo" if exp.cameo.enabled else "baseline",
        "backbone": exp.backbone.name,
        "preset": exp.backbone.preset,
        "seed": str(exp.seed),
        "world_size": str(world_size),
        "command": " ".join(sys.argv)[:1000],
    }


class OperativeConfigLog:
    """Logs gin's operative config to MLflow once training has taken a step, because gin records
    only the bindings that were used by then; a run that dies earlier still gets it at finish.

    Passed to the Trainer as a tracker: it only listens, so it never fails a run.
    """

    def __init__(self, tracker, operative_config, name: str = "config/operative.gin"):
        self.tracker = tracker
        self.operative_config = operative_config
        self.name = name
        self.logged = False

    def _log(self) -> None:
        if self.logged:
            return
        self.logged = True
        try:
            self.tracker.log_text(self.operative_config(), self.name)
        except Exception as err:  # noqa: BLE001 - a missing config file must not end the training
            print(f"warning: could not log {self.name} to MLflow: {err}", file=sys.stderr)

    def log_params(self, params) -> None:
        pass

    def log_metrics(self, metrics, step: int) -> None:
        if step > 0:
            self._log()

    def flush(self) -> None:
        self._log()

    def finish(self, status: str = "FINISHED", error: str | None = None) -> None:
        self._log()
