"""The grid of a sweep: its spec, the expansion into trials with baselines collapsed, the plan, the dry run.

Nothing here trains or tracks (that is `sweep.runner` on `sweep.executors`), so a sweep can be
listed and checked without torch or MLflow. A sweep file is gin syntax with `sweep.*` bindings only
(read by `config.parse_sweep`):

    sweep.name = 'lambda'                                  # MLflow experiment and run-folder name
    sweep.base = ['gin/experiments/quickstart.gin']        # the experiment every trial starts from
    sweep.fixed = ['train.steps = 1500']                   # bindings shared by every trial
    sweep.axes = {
        'cameo.weight': [0.0, 0.05, 0.5],                  # binding -> list of values
        'run_experiment.seed': [0, 1, 2],
        'source': [                                        # a named axis: values are dicts of
            {'cameo.source': 'depth'},                     # bindings that vary together
            {'cameo.source': 'noisy_depth', 'cameo.source_options': {'noise': 0.1}},
        ],
    }
    sweep.executor = 'local'      # or 'slurm' (submitit)
    sweep.workers = 2             # local pool size; 0 runs trials one by one in this process
    sweep.slurm = {'slurm_partition': 'gpu', 'gpus_per_node': 1, 'timeout_min': 240}
    sweep.local_gpus = [0, 1]     # local pool: one CUDA device per worker, round robin
    sweep.output_dir = None       # default <base run_experiment.output_dir>/sweeps
    sweep.experiment = None       # MLflow experiment, default sweep.name
    sweep.reuse_from = ['backbones']  # experiments whose FINISHED run of a trial's exact configuration
                                  # (its logged params) is copied in instead of training it again

Expansion is the cartesian product of the axes. A point with lambda = 0 or source 'none' trains
no CAMEO at all (`config.spec.is_baseline`), so every such point is collapsed into one baseline per combination of the other
(non-`cameo.*`) axes: its `cameo.*` axis values are dropped and `cameo.weight = 0.0` is bound. A
trial's id hashes its sorted bindings (fixed + axes), so it stays the same across restarts and
machines; restarting a sweep skips the trials whose MLflow run FINISHED and resumes the others
from their run folders.
"""
from __future__ import annotations

import ast
import hashlib
import itertools
import os
import pathlib
import re
from dataclasses import dataclass, field
from typing import Any

from cameo_bench import config
from cameo_bench.config.spec import is_baseline

REPO = pathlib.Path(__file__).resolve().parents[2]
EXECUTORS = ("local", "slurm")
_BINDING_KEY = re.compile(r"^[A-Za-z_][\w]*\.[A-Za-z_]\w*$")


class SweepError(ValueError):
    """A sweep file that cannot be expanded; the message names the file and the offending key."""


@dataclass
class SweepSpec:
    name: str
    base: list[str]
    axes: dict[str, list]
    fixed: list[str] = field(default_factory=list)
    experiment: str | None = None
    output_dir: str | None = None
    executor: str = "local"
    workers: int = 1
    slurm: dict[str, Any] = field(default_factory=dict)
    local_gpus: list[int] | None = None
    reuse_from: list[str] = field(default_factory=list)
    path: str = "<python>"  # the sweep file, for messages and provenance

    @property
    def experiment_name(self) -> str:
        return self.experiment or self.name


@dataclass(frozen=True)
class Trial:
    id: str
    bindings: dict[str, str]  # binding key -> gin value text: fixed + this point's axis values
    varied: tuple[str, ...]  # the keys that came from the axes, in axis order (for labels)
    baseline: bool

    @property
    def label(self) -> str:
        parts = [f"{key.rsplit('.', 1)[-1]}={self.bindings[key]}" for key in self.varied]
        return " ".join((["baseline"] if self.baseline else []) + parts) or "base"

    def binding_strings(self) -> list[str]:
        return [f"{key} = {value}" for key, value in self.bindings.items()]


# ---------------------------------------------------------------------------------------------
# reading a sweep file


def load(path: str | os.PathLike, overrides: list[str] | None = None) -> SweepSpec:
    """Read a sweep file; `overrides` are extra `sweep.*` bindings (e.g. from the command line)."""
    try:
        values = config.parse_sweep(path, overrides)
    except config.ConfigError as err:
        raise SweepError(str(err)) from None
    spec = SweepSpec(path=str(path), **values)
    validate(spec)
    return spec


def validate(spec: SweepSpec) -> None:
    where = f"sweep file {spec.path}"
    if not isinstance(spec.name, str) or not re.fullmatch(r"[\w.-]+", spec.name):
        raise SweepError(f"{where}: sweep.name must be a plain name (letters, digits, '_.-'), got {spec.name!r}")
    if isinstance(spec.base, str):
        spec.base = [spec.base]
    if not spec.base or not all(isinstance(b, str) for b in spec.base):
        raise SweepError(f"{where}: sweep.base must be a list of gin files, got {spec.base!r}")
    if not isinstance(spec.fixed, (list, tuple)) or not all(isinstance(b, str) and "=" in b for b in spec.fixed):
        raise SweepError(f"{where}: sweep.fixed must be a list of 'scope.param = value' strings, got {spec.fixed!r}")
    if not isinstance(spec.axes, dict) or not spec.axes:
        raise SweepError(f"{where}: sweep.axes must be a non-empty dict of axis -> list of values")
    for axis, values in spec.axes.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise SweepError(f"{where}: axis {axis!r} needs a non-empty list of values, got {values!r}")
        if not _BINDING_KEY.match(axis):
            bad = [v for v in values if not isinstance(v, dict) or not v or not all(_BINDING_KEY.match(k) for k in v)]
            if bad:
                raise SweepError(f"{where}: axis {axis!r} is not a binding ('scope.param'), so it is a named axis "
                                 f"whose values must be dicts of bindings like {{'cameo.source': 'depth'}}; got {bad[0]!r}")
    if spec.executor not in EXECUTORS:
        raise SweepError(f"{where}: sweep.executor must be one of {list(EXECUTORS)}, got {spec.executor!r}")
    if not isinstance(spec.workers, int) or spec.workers < 0:
        raise SweepError(f"{where}: sweep.workers must be an int >= 0, got {spec.workers!r}")
    if not isinstance(spec.slurm or {}, dict):
        raise SweepError(f"{where}: sweep.slurm must be a dict of submitit parameters, got {spec.slurm!r}")
    spec.slurm = dict(spec.slurm or {})
    if isinstance(spec.reuse_from, str):
        spec.reuse_from = [spec.reuse_from]
    if not isinstance(spec.reuse_from, (list, tuple)) or not all(isinstance(e, str) and e for e in spec.reuse_from):
        raise SweepError(f"{where}: sweep.reuse_from must be a list of MLflow experiment names, got {spec.reuse_from!r}")
    spec.reuse_from = list(spec.reuse_from)


# ---------------------------------------------------------------------------------------------
# expansion


def _split_binding(binding: str) -> tuple[str, str]:
    key, _, value = binding.partition("=")
    return key.strip(), value.strip()


def trial_id(bindings: dict[str, str]) -> str:
    """12 hex digits of sha1 over the sorted 'key = value' lines: stable across runs and machines."""
    text = "\n".join(sorted(f"{key} = {value}" for key, value in bindings.items()))
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _is_baseline(values: dict[str, Any], base_cameo: dict[str, Any]) -> bool:
    """The baseline rule on a grid point: its axis values, else what the base config gives."""
    weight = values.get("cameo.weight", base_cameo.get("weight", 1.0))
    source = values.get("cameo.source", base_cameo.get("source", "depth"))
    return is_baseline(weight, source)


def expand(spec: SweepSpec, base_cameo: dict[str, Any] | None = None) -> list[Trial]:
    """The grid as trials, baselines collapsed, in axis order; no gin parsing happens here.

    `base_cameo` holds the `weight` and `source` that base files + fixed bindings give when no axis
    sets them (so a layer sweep over a lambda = 0 base is one baseline, not one trial per layer).
    """
    base_cameo = dict(base_cameo or {})
    fixed: dict[str, str] = {}
    for binding in spec.fixed:
        key, value = _split_binding(binding)
        if key in fixed:
            raise SweepError(f"sweep file {spec.path}: {key!r} appears twice in sweep.fixed")
        fixed[key] = value
    for binding, value in fixed.items():  # fixed cameo values count unless an axis overrides them
        if binding in ("cameo.weight", "cameo.source"):
            base_cameo[binding.split(".")[1]] = _literal(value)

    axes = []  # per axis: list of {binding: value} choices
    for axis, values in spec.axes.items():
        axes.append([dict(v) if not _BINDING_KEY.match(axis) else {axis: v} for v in values])

    trials: dict[str, Trial] = {}
    for combo in itertools.product(*axes):
        point: dict[str, Any] = {}
        for choice in combo:
            point.update(choice)
        baseline = _is_baseline(point, base_cameo)
        if baseline:
            point = {k: v for k, v in point.items() if not k.startswith("cameo.")}
            point["cameo.weight"] = 0.0
        bindings = {k: v for k, v in fixed.items() if k not in point}
        bindings.update({k: repr(v) for k, v in point.items()})
        varied = tuple(k for k in point if not (baseline and k == "cameo.weight"))
        trial = Trial(trial_id(bindings), bindings, varied, baseline)
        trials.setdefault(trial.id, trial)
    return list(trials.values())


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def resolve_gin_file(path: str) -> str:
    """Absolute path: as given if it exists from here, else relative to the repository (like
    `config.parse`), so workers with another working directory read the same file."""
    candidate = pathlib.Path(path)
    if not candidate.exists() and (REPO / candidate).exists():
        candidate = REPO / candidate
    if not candidate.exists():
        raise SweepError(f"gin file not found: {path} (looked in {pathlib.Path.cwd()} and {REPO})")
    return str(candidate.resolve())


@dataclass
class Plan:
    spec: SweepSpec
    gin_files: list[str]  # absolute
    trials: list[Trial]
    run_root: pathlib.Path  # trial t runs in run_root / t.id

    def trial_bindings(self, trial: Trial) -> list[str]:
        """What a worker parses: the trial's bindings plus where its run folder is."""
        return trial.binding_strings() + [f"run_experiment.output_dir = {str(self.run_root)!r}",
                                          f"run_experiment.name = {trial.id!r}"]


def plan(spec: SweepSpec, check: bool = True) -> Plan:
    """Resolve files, expand the grid, and (with `check`) parse every trial's gin config here, so a
    typo in an axis fails before anything starts, naming the trial."""
    gin_files = [resolve_gin_file(f) for f in spec.base]
    try:
        base = config.parse(gin_files, list(spec.fixed))
    except config.ConfigError as err:
        raise SweepError(f"sweep file {spec.path}: base + sweep.fixed do not parse: {err}") from None
    trials = expand(spec, {"weight": base.cameo.weight, "source": base.cameo.source})
    run_root = pathlib.Path(spec.output_dir or pathlib.Path(base.output_dir) / "sweeps").resolve() / spec.name
    result = Plan(spec, gin_files, trials, run_root)
    if check:
        for trial in trials:
            try:
                exp = config.parse(gin_files, result.trial_bindings(trial))
            except config.ConfigError as err:
                raise SweepError(f"sweep file {spec.path}: trial {trial.id} ({trial.label}) does not parse: {err}") from None
            if exp.cameo.enabled == trial.baseline:
                raise SweepError(f"trial {trial.id} ({trial.label}): expected baseline={trial.baseline}, but its "
                                 f"config has cameo.weight={exp.cameo.weight}, cameo.source={exp.cameo.source!r}")
    return result


def describe(p: Plan) -> str:
    """The dry-run listing: one line per trial (id, variant, the bindings that vary), then the count."""
    spec = p.spec
    lines = [f"sweep {spec.name!r} from {spec.path}",
             f"  base:  {', '.join(spec.base)}",
             f"  fixed: {'; '.join(spec.fixed) or '-'}",
             f"  runs:  {p.run_root}/<trial id>    MLflow experiment: {spec.experiment_name!r}"]
    for trial in p.trials:
        varied = "  ".join(f"{key} = {trial.bindings[key]}" for key in trial.varied)
        lines.append(f"{trial.id}  {'baseline' if trial.baseline else 'cameo   '}  {varied}")
    baselines = sum(t.baseline for t in p.trials)
    lines.append(f"{len(p.trials)} trials ({baselines} baseline, {len(p.trials) - baselines} CAMEO)")
    return "\n".join(lines)
