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
SPLITS = ("scene", "frame")  # held-out scenes (dataset.json 'train'/'test') or held-out frames of every scene
RESIZE_MODES = ("center_crop", "stretch")  # data/scene_dataset.py keeps the same tuple
REFERENCE_PLACEMENTS = ("first", "ends")  # data/synthetic.py keeps the same tuple (a test checks they agree)
PREDICTION_TYPES = ("v_prediction", "epsilon")
BETA_SCHEDULES = ("scaled_linear", "squaredcos_cap_v2", "linear")  # squaredcos_cap_v2 is the cosine schedule;
# linear is DDPM's / DiT's betas 1e-4..0.02 (objectives.diffusion.LINEAR_BETA_START/END)
CODEC_KINDS = ("pixel", "vae")
VAE_ENCODINGS = ("mean", "sample")  # the posterior mean, or one draw from it each time a frame is used
HEADS = ("mean", "linear", "mlp", "per_head")
NORMALIZATIONS = ("per_view", "global")
TARGETS = ("onehot_per_view", "onehot_global", "soft")
LOSSES = ("ce", "kl", "l1")
QUERY_VIEWS = ("references", "targets", "both")
KEY_VIEWS = ("all_but_self", "references")
CAMEO_IMPLS = ("auto", "sparse", "dense")  # objectives/alignment.py; auto: sparse unless a dense-only backward mode
NONFINITE = ("stop", "skip")
PRECISIONS = ("auto", "fp32", "bf16")
# Evaluation conventions (`eval.conventions`, implemented in evaluation/metrics.py): a preset name or
# a dict overriding some of the default's entries, e.g. {'psnr': 'global'}.
PSNR_CONVENTIONS = ("per_image", "global")  # mean of per-image PSNRs | PSNR of the MSE over all pixels of all images
SSIM_CONVENTIONS = ("torchmetrics", "gaussian11", "gaussian11_population")
LPIPS_CONVENTIONS = ("vgg+alex", "vgg", "alex")  # which LPIPS trunks are scored (when their weights are on disk)
CONVENTION_PRESETS = {
    "default": {"psnr": "per_image", "ssim": "torchmetrics", "lpips": "vgg+alex"},  # the numbers of before
    "pixelsplat": {"psnr": "per_image", "ssim": "gaussian11", "lpips": "vgg"},  # pixelSplat / MVSplat metric code
}
# foreign layouts a trained model can also be written in (`train.pretrained_layouts`; backbones/export_layouts.py
# keeps the same names, a test checks they agree): a facebookresearch DiT state dict, a diffusers SD UNet folder
PRETRAINED_LAYOUTS = ("dit", "sd_unet")
ATTENTION_TRUTHS = ("auto", "depth", "sfm_tracks", "matches")  # auto = depth, else tracks, else SIFT matches
INDEX_MISSING = ("error", "skip")  # eval.index scenes absent from data.root


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


def path_or_empty(value) -> str | None:
    """A path as a string; '' means "none" (e.g. `backbone.init_from = ''`: random initialisation)."""
    return None if isinstance(value, str) else "a string: a local path, or '' for none"


def text(optional: bool = False) -> Check:
    def check(value):
        if (optional and value is None) or (isinstance(value, str) and value):
            return None
        return ("None or " if optional else "") + "a non-empty string"
    return check


def mapping(value) -> str | None:
    ok = isinstance(value, dict) and all(isinstance(k, str) for k in value)
    return None if ok else "a dict with string keys"


def image_hw(optional: bool = False) -> Check:
    """A positive int (square) or (H, W) of positive ints."""
    def check(value):
        if optional and value is None:
            return None
        if integer(1)(value) is None:
            return None
        if isinstance(value, (tuple, list)) and len(value) == 2 and all(integer(1)(v) is None for v in value):
            return None
        return ("None or " if optional else "") + "an integer >= 1 (square) or (H, W) of integers >= 1"
    return check


def int_range(minimum: int) -> Check:
    """(low, high) integers with minimum <= low <= high."""
    def check(value):
        ok = (isinstance(value, (tuple, list)) and len(value) == 2
              and all(integer(minimum)(v) is None for v in value) and value[0] <= value[1])
        return None if ok else f"(low, high) integers with {minimum} <= low <= high"
    return check


def degree_range(value) -> str | None:
    """None (no filter) or (low, high) degrees with 0 <= low <= high <= 180."""
    if value is None:
        return None
    ok = (isinstance(value, (tuple, list)) and len(value) == 2
          and all(number(0.0, 180.0)(v) is None for v in value) and value[0] <= value[1])
    return None if ok else "None or (low, high) degrees with 0 <= low <= high <= 180"


def frame_list(value) -> str | None:
    """A list of frame names (str) or frame indices (int >= 0), no duplicates; empty = unused."""
    ok = (isinstance(value, (tuple, list))
          and all((isinstance(v, str) and v) or integer(0)(v) is None for v in value)
          and len(set(value)) == len(value))
    return None if ok else "a list of distinct frame names (str) or frame indices (int >= 0)"


def resolve_conventions(value: str | dict) -> dict[str, str]:
    """`eval.conventions` as {'psnr', 'ssim', 'lpips'} -> convention name: a preset (CONVENTION_PRESETS)
    or a dict of overrides of the 'default' preset. Raises ValueError naming what is valid."""
    valid = {"psnr": PSNR_CONVENTIONS, "ssim": SSIM_CONVENTIONS, "lpips": LPIPS_CONVENTIONS}
    if isinstance(value, str):
        if value not in CONVENTION_PRESETS:
            raise ValueError(f"a preset name in {sorted(CONVENTION_PRESETS)} or a dict with keys {sorted(valid)}")
        return dict(CONVENTION_PRESETS[value])
    if not isinstance(value, dict):
        raise ValueError(f"a preset name in {sorted(CONVENTION_PRESETS)} or a dict with keys {sorted(valid)}")
    out = dict(CONVENTION_PRESETS["default"])
    for key, name in value.items():
        if key not in valid:
            raise ValueError(f"a dict with keys in {sorted(valid)} (got {key!r})")
        if name not in valid[key]:
            raise ValueError(f"{key!r} one of {list(valid[key])} (got {name!r})")
        out[key] = name
    return out


def convention_choice(value) -> str | None:
    try:
        resolve_conventions(value)
    except ValueError as err:
        return str(err)
    return None


def subset_of(*valid: str) -> Check:
    """A list or tuple of distinct names from `valid` (empty = none)."""
    def check(value):
        ok = (isinstance(value, (tuple, list)) and all(isinstance(v, str) and v in valid for v in value)
              and len(set(value)) == len(value))
        return None if ok else f"a list of distinct names from {list(valid)} (empty = none)"
    return check


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
    # '' = random init; else a diffusers SD-format UNet folder (mv_unet), a facebookresearch DiT
    # checkpoint (mv_dit) or a save_pretrained folder: the architecture then comes from the source
    init_from: str = knob("", path_or_empty)


@dataclass
class DataSpec(_Checked):
    """`kind="synthetic"` renders embedded scenes; `kind="folder"` reads scene folders at `root`.

    A sample holds `num_views` views: `num_ref` references first, then `num_views - num_ref`
    targets. `image_size` is an int (square) or `(H, W)`; scene-folder frames of another aspect
    are centre-cropped to it (`resize_mode = 'center_crop'`, with a warning naming the share
    cut off) or stretched (`'stretch'`), and K follows either way. So give portrait frames a
    portrait size, e.g. `data.image_size = (64, 48)` for 4:3 portrait photos.
    Scene-folder sampling (`data/scene_dataset.py`): `samples_per_scene` distinct frame draws per
    scene (the epoch is `scenes x samples_per_scene` items), consecutive frame gaps in
    `frame_spacing`, the largest reference-target rotation in `view_change_deg`. `split = 'scene'`
    reads the dataset.json splits 'train' and 'test' (which must not share a scene); `split =
    'frame'` holds out frames of every scene instead: `test_frames` (names or indices) if given,
    else every `test_every`-th frame (0, n, 2n, ...), which training never reads and evaluation
    uses as targets, with the nearest training frames as references. `match_image_size` adds a
    `match_image` key at that size (same crop) for the `matches` source to run SIFT on.
    """

    SECTION = "data"
    kind: str = knob("synthetic", one_of(*DATA_KINDS))
    root: str | None = knob(None, text(optional=True))
    num_scenes: int = knob(512, integer(1))
    num_eval_scenes: int = knob(16, integer(1))
    num_views: int = knob(3, integer(1))
    num_ref: int = knob(1, integer(0))  # views are ordered references first
    image_size: int | tuple[int, int] = knob(32, image_hw())  # int = square, else (H, W)
    # scene folders only (kind = 'folder'); the defaults are the sampling of before these knobs
    samples_per_scene: int = knob(1, integer(1))
    frame_spacing: tuple[int, int] = knob((1, 1), int_range(1))
    view_change_deg: tuple[float, float] | None = knob(None, degree_range)
    resize_mode: str = knob("center_crop", one_of(*RESIZE_MODES))
    split: str = knob("scene", one_of(*SPLITS))
    test_every: int = knob(8, integer(2))
    test_frames: tuple = knob((), frame_list)
    match_image_size: int | tuple[int, int] | None = knob(None, image_hw(optional=True))
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
        if self.kind == "synthetic":
            folder_only = {"samples_per_scene": 1, "frame_spacing": (1, 1), "view_change_deg": None,
                           "split": "scene", "test_frames": (), "match_image_size": None}
            for name, default in folder_only.items():
                value = getattr(self, name)
                if (tuple(value) if isinstance(value, list) else value) != default:
                    self._fail(f"data.{name} = {value!r} applies to scene folders (data.kind = 'folder'); "
                               "synthetic scenes render num_views views each: set data.num_scenes, "
                               "data.azimuth_step_deg or data.scene_options instead", name, "kind")


@dataclass(frozen=True)
class DiffusionSpec(_Checked):
    """The noise schedule and objective; `objectives.diffusion.MultiViewDiffusion` is built from it.

    Frozen: the objective derives its betas from it once, so it must not change afterwards.
    `snr_shift` divides the SNR at every timestep (CAMEO: 4; CAT3D shifts log-SNR by log #targets);
    the shift is applied before the zero-terminal rescale, as in CAMEO's scheduler.
    `min_snr_gamma` > 0 weighs each training sample's loss by min(SNR, gamma) / (SNR + 1) (v) or
    / SNR (epsilon), Min-SNR-gamma (Hang et al. 2023; 5 in their paper and in diffusers' scripts),
    which lowers the weight of the nearly clean timesteps; held-out losses stay unweighted.
    """

    SECTION = "diffusion"
    prediction_type: str = knob("v_prediction", one_of(*PREDICTION_TYPES))
    beta_schedule: str = knob("scaled_linear", one_of(*BETA_SCHEDULES))
    num_train_timesteps: int = knob(1000, integer(2))
    snr_shift: float = knob(1.0, number(0.0, above=True, note="1 = no shift"))
    rescale_zero_terminal_snr: bool = knob(False, boolean)
    camera_dropout: float = knob(0.1, number(0.0, 1.0))
    min_snr_gamma: float = knob(0.0, number(0.0, note="0 = every timestep weighs the same"))

    def _check_together(self) -> None:
        if self.rescale_zero_terminal_snr and self.prediction_type == "epsilon":
            # At SNR = 0, x_t is pure noise: eps is trivially x_t and x0 = (x_t - eps) / 0.
            self._fail("diffusion.rescale_zero_terminal_snr = True needs diffusion.prediction_type = 'v_prediction': "
                       "with 'epsilon' the sampler divides by sqrt(alpha_bar_T) = 0",
                       "rescale_zero_terminal_snr", "prediction_type")


@dataclass
class CodecSpec(_Checked):
    """The space the model diffuses in (`objectives.codecs`): `pixel` (x0 = 2 image - 1) or `vae`
    (a local diffusers `AutoencoderKL` folder at `vae_path`; its config gives the scaling and shift).

    `encoding`: the posterior mean, or a fresh draw from the posterior each time a frame is used.
    `decode_batch`: frames per VAE decode call (evaluation, figures), which bounds decoder memory.
    `cache`: folder data (`data.kind = 'folder'`) is encoded once per frame into a latent cache
    (`data.latents`), so training reads no image; `cache_dir` '' = `<data.root>/latents`.
    """

    SECTION = "codec"
    kind: str = knob("pixel", one_of(*CODEC_KINDS))
    vae_path: str = knob("", path_or_empty)
    encoding: str = knob("mean", one_of(*VAE_ENCODINGS))
    decode_batch: int = knob(8, integer(1))
    encode_batch: int = knob(16, integer(1))  # frames per VAE encode call (cache building, on-the-fly encoding)
    cache: bool = knob(True, boolean)
    cache_dir: str = knob("", path_or_empty)

    def _check_together(self) -> None:
        if self.kind == "pixel" and self.vae_path:
            self._fail(f"codec.vae_path = {self.vae_path!r} is set but codec.kind = 'pixel' would ignore it: "
                       "set codec.kind = 'vae' (or clear codec.vae_path)", "vae_path", "kind")


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
    # the loss's implementation (objectives/alignment.py): 'dense' reproduces runs made before the
    # sparse path bit for bit; both equal the full-map loss to 1e-5
    impl: str = knob("auto", one_of(*CAMEO_IMPLS))
    # a run whose CAMEO term has no supervised pair for this many consecutive steps stops with an
    # error naming the source, the layer grid and the batch keys (0 = never stop)
    max_zero_pair_steps: int = knob(20, integer(0))
    # correspondence targets of a deterministic per-sample source (depth, pointmap_nn, epipolar,
    # matches) kept per training item and layer grid, up to this many MB (engine/target_cache.py;
    # the same targets as computing them every step; 0 = compute every step)
    target_cache_mb: int = knob(256, integer(0))

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
    # EMA warm-up: the decay at update n is min(ema_decay, (1 + n) / (ema_warmup + n)), so early
    # evaluations do not average in the random initialisation (0 = the fixed decay from step 1)
    ema_warmup: int = knob(0, integer(0))
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
    # torch.compile the backbone's forward (engine/build.py); the first steps then pay the compile
    # time (minutes on a CPU: reports/benchmarks/README.md says when it pays off)
    compile: bool = knob(False, boolean)
    # write the model (the EMA's weights when kept) where `backbone.init_from` reads it, at every
    # checkpoint and at the end (engine/pretrained.py): a save_pretrained folder at `pretrained_dir`
    # ('' = '<run_dir>/pretrained'), plus, inside it, each of `pretrained_layouts`: 'dit' (mv_dit:
    # dit.pt, facebookresearch/DiT keys), 'sd_unet' (mv_unet: sd_unet/, a diffusers UNet2DConditionModel)
    save_pretrained: bool = knob(False, boolean)
    pretrained_dir: str = knob("", path_or_empty)
    pretrained_layouts: tuple = knob((), subset_of(*PRETRAINED_LAYOUTS))
    # keep the backbone's camera path at zero from the start (a model that ignores its cameras, as
    # DiT and SD do): what the layouts above need, e.g. for a single-view image prior
    camera_inert: bool = knob(False, boolean)

    def _check_together(self) -> None:
        if self.pretrained_layouts and not self.save_pretrained:
            self._fail(f"train.pretrained_layouts = {list(self.pretrained_layouts)} is set but train.save_pretrained "
                       "is False: nothing would be written", "pretrained_layouts", "save_pretrained")


@dataclass
class EvalSpec(_Checked):
    SECTION = "eval"
    every: int = knob(250, integer(0))  # 0 = never
    num_scenes: int = knob(16, integer(1))
    batch_size: int = knob(8, integer(1))
    sampler_steps: int = knob(20, integer(1))
    # DDIM eta: 0 = deterministic DDIM, 1 = ancestral (DDPM-like) steps; a fresh draw at every step
    # keeps a small model's errors from compounding along one deterministic path
    sampler_eta: float = knob(0.0, number(0.0, 1.0))
    guidance_scale: float = knob(1.0, number(0.0, note="1 = no guidance"))
    attention: bool = knob(True, boolean)  # attention-correspondence metrics for every layer
    attention_timestep: int = knob(500, integer(0))  # noise level at which attention correspondence is measured
    lpips: bool = knob(True, boolean)  # used only when the backbone weights are on disk
    at_start: bool = knob(True, boolean)
    figures: bool = knob(True, boolean)  # sample grid + attention figure of the first eval scenes, as tracker artifacts
    # metric conventions, named in every evaluation's output: a preset ('default', 'pixelsplat') or a
    # dict overriding the default's {'psnr': 'per_image'|'global', 'ssim': 'torchmetrics'|'gaussian11'|
    # 'gaussian11_population', 'lpips': 'vgg+alex'|'vgg'|'alex'} (evaluation/metrics.py says what each is)
    conventions: str | dict = knob("default", convention_choice)
    # a pixelSplat/MVSplat evaluation index JSON {scene: {"context": [i, ...], "target": [k, ...]} | null}:
    # the held-out set is exactly its entries (frame indices into each scene folder's frame order);
    # eval.num_scenes still caps how many entries are read (evaluation/protocol.py)
    index: str | None = knob(None, text(optional=True))
    index_root: str | None = knob(None, text(optional=True))  # the index's scene-folder dataset; None = data.root
    index_missing: str = knob("error", one_of(*INDEX_MISSING))  # 'skip': leave out index scenes not under the root
    # truth of the attention-correspondence metrics: dense depth, SfM tracks (track_ids/track_uv) or SIFT
    # matches of the batch images; 'auto' takes the first the batch has, in that order
    attention_truth: str = knob("auto", one_of(*ATTENTION_TRUTHS))
    # held-out diffusion loss at K fixed (t, noise) pairs, t = k T / K, and one-step x0 PSNR at T/4, T/2, 3T/4
    # (evaluation/convergence.py): K forwards per batch (plus those x0 timesteps not among them); 0 = off
    convergence_timesteps: int = knob(8, integer(0))


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
    codec: CodecSpec = knob(check=_section(CodecSpec), factory=CodecSpec)
    cameo: CameoSpec = knob(check=_section(CameoSpec), factory=CameoSpec)
    optim: OptimSpec = knob(check=_section(OptimSpec), factory=OptimSpec)
    train: TrainSpec = knob(check=_section(TrainSpec), factory=TrainSpec)
    eval: EvalSpec = knob(check=_section(EvalSpec), factory=EvalSpec)
    tracking: TrackingSpec = knob(check=_section(TrackingSpec), factory=TrackingSpec)
    # True when `config.shrink.shrunk` made this experiment (gin: `run_experiment.shrink = True`):
    # micro shapes and random weights, and `codec.kind = 'vae'` without a `vae_path` then means a
    # random micro VAE, so a paper recipe runs in CI without its local folders.
    shrink: bool = knob(False, boolean)

    def _check_together(self) -> None:
        T = self.diffusion.num_train_timesteps
        if self.eval.attention_timestep >= T:
            raise SpecError(f"eval.attention_timestep = {self.eval.attention_timestep} must be < "
                            f"diffusion.num_train_timesteps = {T}", "eval.attention_timestep",
                            "diffusion.num_train_timesteps")
        if self.eval.sampler_steps > T:
            raise SpecError(f"eval.sampler_steps = {self.eval.sampler_steps} must be <= "
                            f"diffusion.num_train_timesteps = {T}", "eval.sampler_steps", "diffusion.num_train_timesteps")
        if self.cameo.enabled and self.data.num_views < 2:
            raise SpecError(f"cameo.weight = {self.cameo.weight} supervises attention between views, but data.num_views "
                            "= 1 has one view per sample: set cameo.weight = 0 (e.g. for a single-view prior)",
                            "cameo.weight", "data.num_views")
        if self.eval.index is not None and self.data.kind != "folder":
            raise SpecError(f"eval.index = {self.eval.index!r} needs scene folders (data.kind = 'folder', "
                            f"data.root); data.kind is {self.data.kind!r}", "eval.index", "data.kind")

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
                              TrackingSpec, CodecSpec)
