"""The experiment as plain values: one dataclass per gin section, each field checked on construction.

The engine only ever sees these dataclasses; `config.gin_root` fills them from gin, so the engine
stays importable and testable without gin, and every knob has one documented default and range.
Every field carries its check (`knob`): a typo (`train.precision = 'bf61'`) or an out-of-range
value (`train.steps = -5`) used to train something else silently; now it fails where the spec is
built, naming the binding and the valid values. Checks that need the data or the model (layer
names, a source against the batch keys, the batch against the world size) stay in the engine.

The valid-value tuples of the CAMEO loss live here, not in `objectives.alignment`, so that this
module imports nothing (the sweep planner and the run labels read it without loading torch); the
loss imports them from here.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable

DATA_KINDS = ("synthetic", "folder")
REFERENCE_PLACEMENTS = ("first", "ends")  # data/synthetic.py keeps the same tuple (a test checks they agree)
PREDICTION_TYPES = ("v_prediction", "epsilon")
BETA_SCHEDULES = ("scaled_linear", "squaredcos_cap_v2")  # squaredcos_cap_v2 is the cosine schedule
HEADS = ("mean", "linear", "mlp", "per_head")
NORMALIZATIONS = ("per_view", "global")
TARGETS = ("onehot_per_view", "onehot_global", "soft")
LOSSES = ("ce", "kl", "l1")
QUERY_VIEWS = ("references", "targets", "both")
KEY_VIEWS = ("all_but_self", "references")
NONFINITE = ("stop", "skip")
PRECISIONS = ("auto", "fp32", "bf16")


def is_baseline(weight: float, source: str) -> bool:
    """THE baseline rule: lambda 0 or source 'none' trains no CAMEO at all (no tap, no extra cost).

    `weight` is a number (parse logged param strings first); anything else is not a baseline weight.
    """
    return weight == 0 or source == "none"


class SpecError(ValueError):
    """A field outside its valid values. `bindings` are the gin names involved (`train.steps`; two
    for a cross-field check), so the gin root can say where they were set; `detail` is the message."""

    def __init__(self, detail: str, *bindings: str):
        super().__init__(detail)
        self.detail = detail
        self.bindings = bindings


# ---------------------------------------------------------------------------------------------
# checks: each returns None for a valid value, else what a valid value is (for the message)

Check = Callable[[Any], "str | None"]


def one_of(*valid: str) -> Check:
    def check(value):
        if isinstance(value, str) and value in valid:
            return None
        close = difflib.get_close_matches(str(value), valid, n=1)
        return f"one of {list(valid)}" + (f" (did you mean {close[0]!r}?)" if close else "")
    return check


def integer(minimum: int | None = None, optional: bool = False) -> Check:
    def check(value):
        if optional and value is None:
            return None
        if isinstance(value, numbers.Integral) and not isinstance(value, bool) and (minimum is None or value >= minimum):
            return None
        return ("None or " if optional else "") + "an integer" + (f" >= {minimum}" if minimum is not None else "")
    return check


def number(low: float | None = None, high: float | None = None, *, above: bool = False, below: bool = False,
           optional: bool = False, note: str = "") -> Check:
    """A finite real in [low, high]; `above`/`below` make that end open."""
    def check(value):
        if optional and value is None:
            return None
        ok = (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
              and (low is None or (value > low if above else value >= low))
              and (high is None or (value < high if below else value <= high)))
        if ok:
            return None
        if low is not None and high is not None:
            bounds = f" in {'(' if above else '['}{low}, {high}{')' if below else ']'}"
        elif low is not None:
            bounds = f" {'>' if above else '>='} {low}"
        else:
            bounds = f" {'<' if below else '<='} {high}" if high is not None else ""
        return ("None or " if optional else "") + "a finite number" + bounds + (f" ({note})" if note else "")
    return check


def boolean(value) -> str | None:
    return None if isinstance(value, bool) else "True or False"


def text(optional: bool = False) -> Check:
    def check(value):
        if (optional and value is None) or (isinstance(value, str) and value):
            return None
        return ("None or " if optional else "") + "a non-empty string"
    return check


def mapping(value) -> str | None:
    ok = isinstance(value, dict) and all(isinstance(k, str) for k in value)
    return None if ok else "a dict with string keys"


def adam_betas(value) -> str | None:
    ok = (isinstance(value, (tuple, list)) and len(value) == 2
          and all(number(0.0, 1.0, below=True)(b) is None for b in value))
    return None if ok else "two numbers in [0, 1), e.g. (0.9, 0.999)"


def knob(default: Any = dataclasses.MISSING, check: Check | None = None, *, factory: Any = dataclasses.MISSING):
    """A spec field with its check (run by `_Checked.__post_init__`); no field goes unchecked."""
    if check is None:
        raise TypeError("every spec field needs a check")
    return dataclasses.field(default=default, default_factory=factory, metadata={"check": check})


class _Checked:
    """Runs every field's check, then the cross-field checks of `_check_together`."""

    SECTION = ""  # the gin scope, e.g. "train": messages name `train.steps`, not `steps`

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            valid = f.metadata["check"](value)
            if valid is not None:
                self._fail(f"{self.SECTION}.{f.name} = {value!r} is not valid: use {valid}", f.name)
        self._check_together()

    def _check_together(self) -> None:
        pass

    def _fail(self, detail: str, *names: str):
        raise SpecError(detail, *(f"{self.SECTION}.{name}" for name in names))


# ---------------------------------------------------------------------------------------------
# the sections


@dataclass
class BackboneSpec(_Checked):
    """Name and preset are checked by the backbone registry when the model is built."""

    SECTION = "backbone"
    name: str = knob("mv_dit", text())
    preset: str = knob("tiny", text())
    overrides: dict[str, Any] = knob(check=mapping, factory=dict)
    gradient_checkpointing: bool = knob(False, boolean)


@dataclass
class DataSpec(_Checked):
    """`kind="synthetic"` renders embedded scenes; `kind="folder"` reads scene folders at `root`."""

    SECTION = "data"
    kind: str = knob("synthetic", one_of(*DATA_KINDS))
    root: str | None = knob(None, text(optional=True))
    num_scenes: int = knob(512, integer(1))
    num_eval_scenes: int = knob(16, integer(1))
    num_views: int = knob(3, integer(1))
    num_ref: int = knob(1, integer(0))  # views are ordered references first
    image_size: int = knob(32, integer(1))
    azimuth_step_deg: float = knob(30.0, number())
    # synthetic only: 'first' = references are the first views of the orbit (targets extrapolate),
    # 'ends' = the 2 references bracket the targets (interpolation; data/synthetic.py says why)
    reference_placement: str = knob("first", one_of(*REFERENCE_PLACEMENTS))
    scene_options: dict[str, Any] = knob(check=mapping, factory=dict)  # synthetic only: SceneConfig fields
    seed: int = knob(0, integer())
    batch_size: int = knob(8, integer(1))

    def _check_together(self) -> None:
        if self.num_ref >= self.num_views:
            self._fail(f"data.num_ref = {self.num_ref} must be < data.num_views = {self.num_views}: "
                       "every sample needs a target view", "num_ref", "num_views")
        if self.kind == "folder" and self.root is None:
            self._fail("data.kind = 'folder' needs data.root (a scene-folder dataset root)", "kind", "root")


@dataclass(frozen=True)
class DiffusionSpec(_Checked):
    """The noise schedule and objective; `objectives.diffusion.MultiViewDiffusion` is built from it.

    Frozen: the objective derives its betas from it once, so it must not change afterwards.
    `snr_shift` divides the SNR at every timestep (CAMEO: 4; CAT3D shifts log-SNR by log #targets);
    the shift is applied before the zero-terminal rescale, as in CAMEO's scheduler.
    """

    SECTION = "diffusion"
    prediction_type: str = knob("v_prediction", one_of(*PREDICTION_TYPES))
    beta_schedule: str = knob("scaled_linear", one_of(*BETA_SCHEDULES))
    num_train_timesteps: int = knob(1000, integer(2))
    snr_shift: float = knob(1.0, number(0.0, above=True, note="1 = no shift"))
    rescale_zero_terminal_snr: bool = knob(False, boolean)
    camera_dropout: float = knob(0.1, number(0.0, 1.0))

    def _check_together(self) -> None:
        if self.rescale_zero_terminal_snr and self.prediction_type == "epsilon":
            # At SNR = 0, x_t is pure noise: eps is trivially x_t and x0 = (x_t - eps) / 0.
            self._fail("diffusion.rescale_zero_terminal_snr = True needs diffusion.prediction_type = 'v_prediction': "
                       "with 'epsilon' the sampler divides by sqrt(alpha_bar_T) = 0",
                       "rescale_zero_terminal_snr", "prediction_type")


@dataclass
class CameoSpec(_Checked):
    """The three CAMEO knobs (weight, layer, source) plus the loss variants.

    `weight = 0` or `source = "none"` is the baseline (`is_baseline`): no tap, no extra cost.
    `layer` is a layer name or a selector understood by `MultiViewBackbone.resolve_layer`, and
    `source` a correspondence source name; both are checked against the model and the registry.
    `log_eps = 0` is the exact log-softmax; > 0 the released code's `log(p + log_eps)` (1e-8).
    """

    SECTION = "cameo"
    weight: float = knob(0.0, number(0.0, note="0 = baseline"))
    layer: str = knob("depth:0.5", text())
    source: str = knob("depth", text())
    source_options: dict[str, Any] = knob(check=mapping, factory=dict)
    head: str = knob("mean", one_of(*HEADS))
    normalization: str = knob("per_view", one_of(*NORMALIZATIONS))
    target: str = knob("onehot_per_view", one_of(*TARGETS))
    loss: str = knob("ce", one_of(*LOSSES))
    query_views: str = knob("both", one_of(*QUERY_VIEWS))
    key_views: str = knob("all_but_self", one_of(*KEY_VIEWS))
    queries_per_view: int | None = knob(None, integer(1, optional=True))  # None = every query token
    chunk_size: int = knob(1024, integer(1))
    log_eps: float = knob(0.0, number(0.0, note="0 = exact log-softmax"))

    @property
    def enabled(self) -> bool:
        return not is_baseline(self.weight, self.source)


@dataclass
class OptimSpec(_Checked):
    SECTION = "optim"
    lr: float = knob(3e-4, number(0.0, above=True))
    weight_decay: float = knob(0.01, number(0.0))
    betas: tuple[float, float] = knob((0.9, 0.999), adam_betas)
    warmup_steps: int = knob(50, integer(0))
    grad_clip: float | None = knob(1.0, number(0.0, optional=True, note="None or 0 = no clipping"))
    ema_decay: float | None = knob(None, number(0.0, 1.0, below=True, optional=True, note="None or 0 = no EMA"))
    grad_accum: int = knob(1, integer(1))


@dataclass
class TrainSpec(_Checked):
    SECTION = "train"
    steps: int = knob(1000, integer(0))
    log_every: int = knob(10, integer(1))
    checkpoint_every: int = knob(250, integer(0))  # 0 = never
    nonfinite: str = knob("stop", one_of(*NONFINITE))  # "skip": drop the update, count it, go on
    precision: str = knob("auto", one_of(*PRECISIONS))  # "auto" = bf16 autocast on CUDA, fp32 on CPU
    progress: bool = knob(True, boolean)


@dataclass
class EvalSpec(_Checked):
    SECTION = "eval"
    every: int = knob(250, integer(0))  # 0 = never
    num_scenes: int = knob(16, integer(1))
    batch_size: int = knob(8, integer(1))
    sampler_steps: int = knob(20, integer(1))
    guidance_scale: float = knob(1.0, number(0.0, note="1 = no guidance"))
    attention: bool = knob(True, boolean)  # attention-correspondence metrics for every layer
    attention_timestep: int = knob(500, integer(0))  # noise level at which attention correspondence is measured
    lpips: bool = knob(True, boolean)  # used only when the backbone weights are on disk
    at_start: bool = knob(True, boolean)
    figures: bool = knob(True, boolean)  # sample grid + attention figure of the first eval scenes, as tracker artifacts


@dataclass
class TrackingSpec(_Checked):
    """MLflow tracking of `cameo-bench train`; its command-line flags win over these."""

    SECTION = "tracking"
    enabled: bool = knob(True, boolean)
    experiment: str | None = knob(None, text(optional=True))  # default: run_experiment.name
    uri: str | None = knob(None, text(optional=True))  # default: MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db


def _section(cls: type) -> Check:
    return lambda value: None if isinstance(value, cls) else f"a {cls.__name__}"


@dataclass
class Experiment(_Checked):
    SECTION = "run_experiment"
    name: str = knob("experiment", text())
    output_dir: str = knob("runs", text())
    seed: int = knob(0, integer())
    backbone: BackboneSpec = knob(check=_section(BackboneSpec), factory=BackboneSpec)
    data: DataSpec = knob(check=_section(DataSpec), factory=DataSpec)
    diffusion: DiffusionSpec = knob(check=_section(DiffusionSpec), factory=DiffusionSpec)
    cameo: CameoSpec = knob(check=_section(CameoSpec), factory=CameoSpec)
    optim: OptimSpec = knob(check=_section(OptimSpec), factory=OptimSpec)
    train: TrainSpec = knob(check=_section(TrainSpec), factory=TrainSpec)
    eval: EvalSpec = knob(check=_section(EvalSpec), factory=EvalSpec)
    tracking: TrackingSpec = knob(check=_section(TrackingSpec), factory=TrackingSpec)

    def _check_together(self) -> None:
        T = self.diffusion.num_train_timesteps
        if self.eval.attention_timestep >= T:
            raise SpecError(f"eval.attention_timestep = {self.eval.attention_timestep} must be < "
                            f"diffusion.num_train_timesteps = {T}", "eval.attention_timestep",
                            "diffusion.num_train_timesteps")
        if self.eval.sampler_steps > T:
            raise SpecError(f"eval.sampler_steps = {self.eval.sampler_steps} must be <= "
                            f"diffusion.num_train_timesteps = {T}", "eval.sampler_steps", "diffusion.num_train_timesteps")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat_params(self) -> dict[str, str]:
        """`section.key -> str(value)`, the form trackers store as parameters."""
        flat: dict[str, str] = {}
        for section, values in self.to_dict().items():
            if isinstance(values, dict):
                for key, value in values.items():
                    flat[f"{section}.{key}"] = str(value)
            else:
                flat[section] = str(values)
        return flat


SECTIONS: tuple[type, ...] = (BackboneSpec, DataSpec, DiffusionSpec, CameoSpec, OptimSpec, TrainSpec, EvalSpec,
                              TrackingSpec)
