"""One tracked training process, the same for `cameo-bench train` and a sweep trial: MLflow run, records, build + fit.

What it adds around `build_run` + `fit`: the MLflow run (search tags,
raw and operative gin config, environment, checkpoint path, the resolved and all attention
layers), the run folder's config and command files, and a failure record (traceback artifact,
FAILED/KILLED status) whenever the run ends early, in building or in training. Kept out of the
CLI so that the sweep executors do not import a command module.
"""
from __future__ import annotations

import pathlib
import sys
import traceback
from dataclasses import dataclass, field
from typing import Sequence

from cameo_bench.config.spec import Experiment
from cameo_bench.engine.build import Run, build_run, run_dir_of
from cameo_bench.engine.checkpoint import latest_path
from cameo_bench.engine.signals import interrupted
from cameo_bench.engine.loop import fit, open_log
from cameo_bench.tracking import keys
from cameo_bench.tracking.labels import label_tags, run_label


def run_tags(exp: Experiment, world_size: int, layer: str | None = None) -> dict[str, str]:
    """Tags to group, filter and slice runs by in MLflow's runs table and search (`variant`,
    `backbone`, `preset`, `layer`, `lambda`, `source`, `seed`; params hold the full configuration).
    Before the model is built, `layer` is None and a CAMEO run's `layer` tag is its selector."""
    return {
        **label_tags(exp.flat_params(), layer),
        keys.WORLD_SIZE: str(world_size),
        keys.COMMAND: " ".join(sys.argv)[:1000],
    }


def layer_tags(run: Run) -> dict[str, str]:
    """The supervised layer ("none" for a baseline: it supervises nothing, whichever layer its
    config's selector would name) and every attention layer in forward order."""
    resolved = run.layer or keys.NONE  # `build_run` resolves no layer for a baseline
    return {keys.LAYER_RESOLVED: resolved, keys.LAYER: resolved,
            keys.ATTN_LAYERS: ",".join(layer.name for layer in run.model.attention_layers())}


def run_name(exp: Experiment, layer: str | None = None, extra: Sequence[str] = ()) -> str:
    """THE name of the run (`tracking.labels.run_label`): `mv_dit tiny · CAMEO λ0.5 @blocks.02.attn · s0`."""
    return run_label(exp.flat_params(), layer, extra)


class OperativeConfigLog:
    """Logs gin's operative config to MLflow once training has taken a step, because gin records
    only the bindings that were used by then; a run that dies earlier still gets it at finish.

    Passed to `fit` as a tracker: it only listens, so it never fails a run.
    """

    def __init__(self, tracker, operative_config, name: str = keys.ARTIFACT_OPERATIVE_CONFIG):
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


@dataclass
class MlflowRun:
    """Where a tracked run goes in MLflow: a run of `experiment` (a sweep's trial: a child of its
    parent run, with the sweep's tags)."""

    experiment: str
    run_name: str | None = None  # None: `run_name(exp)`, renamed with the resolved layer once built
    uri: str | None = None
    parent_run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)  # besides `run_tags`
    clear_error: bool = False  # a restarted sweep trial must not keep its previous error
    label_extra: Sequence[str] = ()  # further parts of the run name (a sweep's other axes)


@dataclass
class Note:
    """A text the run keeps twice: as `file` in the run folder and as MLflow artifact `artifact`."""

    file: str
    artifact: str
    text: str


class TrackedRun:
    """Build and train `exp`, recorded in MLflow when `mlflow` is given (on this rank).

    `resume` continues the run folder's checkpoint and its MLflow run. After `fit()`, `tracker`
    is the MLflow tracker (None without one) and `run` the built run (None if building failed).
    """

    def __init__(self, exp: Experiment, *, resume: bool = False, device=None, mlflow: MlflowRun | None = None,
                 world_size: int = 1, notes: Sequence[Note] = ()):
        self.exp = exp
        self.resume = resume
        self.device = device
        self.mlflow = mlflow
        self.world_size = world_size
        self.notes = list(notes)
        self.tracker = None
        self.run: Run | None = None
        self.fitting = False  # from here on, `fit` marks the run's end itself

    @property
    def ckpt_path(self) -> pathlib.Path:
        return self.run.ckpt_path if self.run is not None else latest_path(run_dir_of(self.exp))

    def _start_tracker(self) -> None:
        from cameo_bench import config, tracking

        m = self.mlflow
        self.tracker = tracking.MlflowTracker(
            m.experiment, m.run_name or run_name(self.exp, extra=m.label_extra), run_dir=run_dir_of(self.exp),
            uri=m.uri, parent_run_id=m.parent_run_id, tags={**run_tags(self.exp, self.world_size), **m.tags},
            resume=self.resume)
        if m.clear_error:
            tracking.clear_error(self.tracker.run_id, self.tracker.uri)
        self.tracker.log_text(config.config_str(), keys.ARTIFACT_RAW_CONFIG)
        for note in self.notes:
            self.tracker.log_text(note.text, note.artifact)
        print(f"MLflow run {self.tracker.run_id} in experiment {m.experiment!r} at {self.tracker.uri}",
              file=sys.stderr)

    def _environment_tags(self, run: Run) -> dict[str, str]:
        from cameo_bench import tracking

        tags = {**tracking.environment_tags(str(run.device)), keys.CHECKPOINT_PATH: str(run.ckpt_path.absolute()),
                keys.RUN_DIR: str(run.run_dir.absolute()), **layer_tags(run)}
        if run.device.type == "cuda":
            import torch

            tags[keys.GPU_TYPE] = torch.cuda.get_device_name(run.device)
        return tags

    def fit(self) -> dict[str, float]:
        """Start the MLflow run, build, train; the final evaluation's metrics (empty on ranks > 0).
        Any error is recorded in the MLflow run (traceback, FAILED or KILLED), then re-raised."""
        from cameo_bench import config

        try:
            if self.mlflow is not None:
                self._start_tracker()
            self.run = build_run(self.exp, device=self.device, resume=self.resume)
            log = open_log(self.run)
            if log is not None:
                log.log_text(config.operative_config(), keys.RUN_CONFIG)
                for note in self.notes:
                    log.log_text(note.text, note.file)
            trackers = []
            if self.tracker is not None:
                self.tracker.set_tags(self._environment_tags(self.run))
                if self.mlflow.run_name is None:  # now the selector has resolved to a layer
                    self.tracker.rename(run_name(self.exp, self.run.layer, self.mlflow.label_extra))
                # after the MLflow tracker, so that the run is always marked terminated first
                trackers = [self.tracker, OperativeConfigLog(self.tracker, config.operative_config)]
            self.fitting = True
            return fit(self.run, log=log, trackers=trackers)
        except BaseException as err:
            self._record_failure(err)
            raise

    def _record_failure(self, err: BaseException) -> None:
        if self.tracker is None:
            return
        killed = interrupted(err)
        try:
            if not killed:
                self.tracker.log_text(traceback.format_exc(), keys.ARTIFACT_ERROR)
            if not self.fitting:
                self.tracker.finish("KILLED" if killed else "FAILED", f"{type(err).__name__}: {err}")
        except Exception as log_err:  # noqa: BLE001 - the original error matters more
            print(f"warning: could not record the failure in MLflow run {self.tracker.run_id}: {log_err}",
                  file=sys.stderr)
