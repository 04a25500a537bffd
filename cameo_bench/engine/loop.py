"""The training loop of a `Run`: steps to `train.steps`, with evaluation, figures, checkpoints and logging.

Under torchrun every rank runs this loop; rank 0 alone logs, evaluates, draws and writes
checkpoints while the others wait at a barrier. The training clock (`time/train_seconds`) counts
only the steps, not evaluation or checkpointing, and is saved with the checkpoint.
"""
from __future__ import annotations

import time
import warnings
from typing import Sequence

from cameo_bench.engine import checkpoint, compute, distributed, pretrained
from cameo_bench.engine.build import Run
from cameo_bench.engine.signals import interrupted
from cameo_bench.engine.step import reduce_metrics, train_step
from cameo_bench.evaluation.protocol import convention_params
from cameo_bench.tracking import keys
from cameo_bench.tracking.labels import honest_params
from cameo_bench.tracking.run_log import RunLog


class Sinks:
    """Where a run's record goes: its `RunLog` and trackers (MLflow). Empty on ranks > 0."""

    def __init__(self, log: RunLog | None, trackers: Sequence = ()):
        self.log = log
        self.trackers = list(trackers)

    def _all(self) -> list:
        return ([self.log] if self.log is not None else []) + self.trackers

    def log_params(self, params: dict[str, str]) -> None:
        for sink in self._all():
            sink.log_params(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for sink in self._all():
            sink.log_metrics(metrics, step)

    def set_tags(self, tags: dict[str, str]) -> None:
        """Tags for the sinks that keep them (MLflow); the run log has none."""
        for sink in self._all():
            if tags and hasattr(sink, "set_tags"):
                sink.set_tags(tags)

    def flush(self) -> None:
        for sink in self.trackers + ([self.log] if self.log is not None else []):
            sink.flush()

    def finish(self, status: str, error: str | None) -> None:
        for sink in self._all():
            sink.finish(status, error)

    def file_sinks(self) -> list:
        """The trackers that keep files (MLflow artifacts)."""
        return [t for t in self.trackers if hasattr(t, "log_artifact")]


def logged_params(exp) -> dict[str, str]:
    """The params a run of `exp` records: its configuration, where a baseline says `none` for the
    CAMEO settings it never used, and the conventions eval/* is computed by. Equal params, equal
    training (what `sweep.reuse_from` matches on)."""
    return {**honest_params(exp.flat_params()), **convention_params(exp)}


def open_log(run: Run) -> RunLog | None:
    """Rank 0's log in the run folder. A fresh run starts it anew; a resumed one keeps what was
    logged up to its checkpoint's step. Only training opens it: evaluating a run must not."""
    if not run.dist.is_main:
        return None
    return RunLog(run.run_dir, resume_step=run.state.step if run.resume else None)


def evaluate_run(run: Run, batches: list[dict] | None = None, *, floors: bool = True,
                 omitted: dict[str, str] | None = None) -> dict[str, float]:
    """Evaluation metrics of the run's current weights (EMA's if kept) on its held-out scenes; with
    `floors`, also the trivial predictors' and the depth-warp oracle's (`eval/floor/*`, `eval/oracle/*`).
    Metrics that could not be computed are absent; `omitted` (if given) gets metric -> why."""
    from cameo_bench.evaluation.evaluate import evaluate

    batches = list(run.eval_batches()) if batches is None else batches
    return evaluate(run.eval_model, run.diffusion, batches, run.exp.eval, seed=run.exp.seed,
                    supervised_layer=run.layer, floors=floors, omitted=omitted)


def log_figures(run: Run, sinks: Sinks, step: int) -> None:
    """Generated vs ground-truth views and the supervised layer's attention for the first eval
    scenes, for the trackers that keep files (MLflow). Drawing never stops a training run."""
    targets = sinks.file_sinks()
    if not targets or not run.exp.eval.figures:
        return
    from cameo_bench.evaluation.figures import eval_figures

    folder = keys.figures_folder(step)
    e = run.exp.eval
    try:
        paths = eval_figures(run.eval_model, run.diffusion, next(run.eval_batches()), run.run_dir / folder,
                             layer=run.shown_layer, sampler_steps=e.sampler_steps, guidance_scale=e.guidance_scale,
                             seed=run.exp.seed, timestep=e.attention_timestep, sampler_eta=e.sampler_eta)
    except Exception as err:  # noqa: BLE001 - a figure is not worth a run
        warnings.warn(f"eval figures at step {step} not drawn: {type(err).__name__}: {err}")
        return
    for tracker in targets:
        for path in paths:
            tracker.log_artifact(path, folder)
            if hasattr(tracker, "log_figure"):  # also by key and step, and the latest: where the UI compares runs
                tracker.log_figure(path, step)


def _evaluate_on_main(run: Run, sinks: Sinks, step: int, floors: bool = False) -> None:
    """Rank 0 evaluates (on the unwrapped model: no collectives), the others wait."""
    if run.dist.is_main:
        omitted: dict[str, str] = {}
        run.state.last_metrics = evaluate_run(run, floors=floors, omitted=omitted)
        sinks.log_metrics(run.state.last_metrics, step)
        sinks.set_tags({keys.not_computed(metric): why for metric, why in omitted.items()})
        log_figures(run, sinks, step)
    distributed.barrier()


def _checkpoint(run: Run, sinks: Sinks) -> None:
    """The record first, then the checkpoint: a kill in between leaves metrics past the
    checkpoint's step, which a resumed run's log drops; never a checkpoint whose metrics are lost."""
    sinks.flush()
    checkpoint.save_run(run)
    pretrained.save(run)  # train.save_pretrained: the folder backbone.init_from reads


def fit(run: Run, *, log: RunLog | None = None, trackers: Sequence = ()) -> dict[str, float]:
    """Train to `train.steps`; returns the last evaluation's metrics (empty on ranks > 0).

    `log` defaults to `open_log(run)`; `trackers` get the same calls (rank 0 only). Every rank
    calls it under torchrun. The run ends FINISHED, FAILED (an error) or KILLED (an interrupt,
    SIGTERM included), in every sink, and the error is re-raised.
    """
    exp = run.exp
    main = run.dist.is_main
    pretrained.check(run)  # a layout the model cannot be written in fails now, not after training
    sinks = Sinks(log if log is not None else open_log(run), trackers) if main else Sinks(None)
    sinks.log_params(logged_params(exp))
    floors = True  # the floors do not change with training: logged at this fit's first evaluation only
    progress = None
    if exp.train.progress and main:
        from tqdm.auto import tqdm

        progress = tqdm(total=exp.train.steps, initial=run.state.step, desc=exp.name, dynamic_ncols=True)
    try:
        if run.state.step == 0:  # every rank counts (the CAMEO loss may all-reduce); a resumed run logged it
            sinks.log_metrics(compute.compute_metrics(run), 0)
        if run.state.step == 0 and exp.eval.at_start and exp.eval.every > 0:
            _evaluate_on_main(run, sinks, 0, floors)
            floors = False
        while run.state.step < exp.train.steps:
            step = run.state.step
            tic = time.perf_counter()
            run.step_module.train()
            metrics = train_step(run, step)
            run.state.step = step + 1
            dt = time.perf_counter() - tic
            run.state.train_seconds += dt
            metrics[keys.STEP_SECONDS] = dt
            metrics[keys.TRAIN_SECONDS] = run.state.train_seconds
            done = run.state.step == exp.train.steps
            if run.state.step % exp.train.log_every == 0 or done:
                sinks.log_metrics(reduce_metrics(run, metrics), run.state.step)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(
                    loss=f"{metrics.get(keys.train_loss('diffusion'), float('nan')):.4f}",
                    cameo=f"{metrics.get(keys.train_loss('cameo'), 0.0):.3f}", s_step=f"{dt:.2f}")
            if exp.eval.every > 0 and (run.state.step % exp.eval.every == 0 or done):
                _evaluate_on_main(run, sinks, run.state.step, floors)
                floors = False
            if exp.train.checkpoint_every > 0 and (run.state.step % exp.train.checkpoint_every == 0 or done):
                _checkpoint(run, sinks)
    except BaseException as err:
        sinks.finish("KILLED" if interrupted(err) else "FAILED", f"{type(err).__name__}: {err}")
        raise
    finally:
        if progress is not None:
            progress.close()
    if exp.train.checkpoint_every == 0:  # else the last checkpoint wrote it
        pretrained.save(run)
    sinks.finish("FINISHED", None)
    return run.state.last_metrics
