"""Every name a run writes (metrics, params, tags, files) and a report reads, defined once.

Writers (engine, evaluation, sweeps, tracking) and readers (report, summary) import these instead of
spelling strings, so a name cannot drift between the two sides (the redesign found a param written
under one name and read as a tag under another, and a tag read that nothing wrote). Pure strings and
string functions: importing this module costs nothing and pulls in neither torch nor mlflow.
"""
from __future__ import annotations

# --- metric prefixes (one per kind of number) ---------------------------------------------------
TRAIN = "train/"
EVAL = "eval/"
# Per-layer diagnostics sort after the answer. MLflow 3.17's chart view makes one section per metric
# name up to its last "/" and orders the sections alphabetically (its JS: `Object.keys(sections).sort()`,
# then `localeCompare`), so with `attn/<layer>/` ~30 attention sections came before `eval/`; `diag/`
# would too ("d" < "e"). "zdiag/" puts them after eval/, figures/, time/ and train/.
DIAG = "zdiag/"
ATTN = DIAG + "attn/"
TIME = "time/"
PERTURB = "perturb/"
LEGACY_ATTN = "attn/"  # how attention metrics were named until the diagnostics moved under DIAG


def current_name(name: str) -> str:
    """The name a metric has now, for a name read from a run logged earlier (`attn/<layer>/pck@1`
    -> `zdiag/attn/<layer>/pck@1`); current names pass unchanged. Readers (the report, the summary,
    `load_runs`, `read_metrics`) apply it so that old stores and run folders keep reading."""
    return ATTN + name[len(LEGACY_ATTN):] if name.startswith(LEGACY_ATTN) else name

# --- training ---------------------------------------------------------------------------------
GRAD_NORM = "train/grad_norm"
LR = "train/lr"
SKIPPED_STEPS = "train/skipped_steps"
CAMEO_PAIRS_REF = "train/cameo_pairs_ref"
CAMEO_PAIRS_TGT = "train/cameo_pairs_tgt"
SUMMED_OVER_RANKS = (CAMEO_PAIRS_REF, CAMEO_PAIRS_TGT)  # counts add up over DDP ranks; the rest are means
# the correspondence source's supervised (query token, key view) pairs in a step's batches, before
# query sampling and the loss's query/key-view choice (the loss's own terms: CAMEO_PAIRS_REF/_TGT)
CAMEO_PAIRS_SOURCE = "train/cameo_pairs_source"
SUMMED_OVER_RANKS = (*SUMMED_OVER_RANKS, CAMEO_PAIRS_SOURCE)
STEP_SECONDS = "time/step_seconds"
TRAIN_SECONDS = "time/train_seconds"

# Training compute (engine/compute.py), logged once at step 0: curves can be drawn against
# training FLOPs (step x FLOPs per step) as well as steps and `time/train_seconds`.
COMPUTE = "compute/"
TRAIN_FLOPS_PER_STEP = "compute/train_flops_per_step"  # one optimizer step, all ranks and micro-batches
PARAM_COUNT = "compute/params"  # backbone parameters
HEAD_PARAM_COUNT = "compute/params_head"  # CAMEO head parameters (0 for the mean head and baselines)


def train_loss(term: str) -> str:
    """`train/loss_diffusion`, `train/loss_cameo`."""
    return f"train/loss_{term}"


def cameo_diagnostic(name: str) -> str:
    """`train/cameo_<name>` for the loss's diagnostics (pairs_ref, pairs_tgt, loss_ref, loss_tgt, acc)."""
    return f"train/cameo_{name}"


# --- evaluation -------------------------------------------------------------------------------


def eval_metric(name: str) -> str:
    """`eval/<name>` for a per-image metric (psnr, ssim, lpips_vgg, ...)."""
    return f"eval/{name}"


PSNR = "eval/psnr"
SSIM = "eval/ssim"
LPIPS_VGG = "eval/lpips_vgg"
LPIPS_ALEX = "eval/lpips_alex"
CONSISTENCY = "eval/consistency_l1"
CONSISTENCY_GT = "eval/consistency_l1_gt"

# Floors and ceiling (evaluation/floors.py): trivial predictors and the depth-warp oracle, scored on
# the same target views with the same metrics, logged once per run.
FLOOR = "eval/floor/"
ORACLE = "eval/oracle/"
FLOOR_MEAN_COLOUR = "mean_colour"  # every target view filled with its references' mean colour
FLOOR_COPY_NEAREST = "copy_nearest"  # the reference with the smallest rotation to the target
FLOOR_PREDICTORS = (FLOOR_MEAN_COLOUR, FLOOR_COPY_NEAREST)
ORACLE_DEPTH_WARP = "depth_warp"  # nearest reference warped by ground-truth depth, holes = mean colour


def floor_metric(predictor: str, name: str) -> str:
    """`eval/floor/<predictor>/<name>` (name: psnr, ssim, lpips_vgg, or `in_bin(psnr, '0-30')`)."""
    return f"eval/floor/{predictor}/{name}"


def oracle_metric(oracle: str, name: str) -> str:
    """`eval/oracle/<oracle>/<name>` (e.g. `eval/oracle/depth_warp/psnr`)."""
    return f"eval/oracle/{oracle}/{name}"


# Cheap convergence metrics (evaluation/convergence.py): fixed (timestep, noise) pairs per evaluation.
HELDOUT_LOSS = "eval/heldout_loss"  # mean over the fixed timesteps


X0_PSNR = "eval/x0_psnr"  # PSNR of the target views decoded from the one-step x0 prediction
# dB the one-step x0 PSNR at t = 3T/4 loses when each scene's references are replaced by another
# scene's: ~0 for a model that ignores its references (it cannot synthesise a novel view)
REFERENCE_USE = "eval/reference_use"


def at_timestep(metric: str, t: int) -> str:
    """`eval/heldout_loss/t0250`, `eval/x0_psnr/t0500`: a convergence metric at one fixed timestep
    (zero-padded so that names sort by t)."""
    return f"{metric}/t{t:04d}"


def eval_by_bin(name: str, bin_name: str) -> str:
    """`eval/<metric>/<viewpoint bin>` (e.g. `eval/psnr/0-30`), and `eval/count/<bin>`."""
    return f"eval/{name}/{bin_name}"


COUNT = "count"  # per viewpoint bin: how many images (eval/) or query tokens (attn/) fell into it


def in_bin(name: str, bin_name: str) -> str:
    """`<name>/<viewpoint bin>` (e.g. `pck@1/0-30`, `count/90+`): the per-bin form of a metric name."""
    return f"{name}/{bin_name}"


SUPERVISED_LAYER = "supervised"  # the alias under which the supervised layer's attention metrics repeat


def attn(layer: str, name: str) -> str:
    """`zdiag/attn/<layer>/<name>`: attention-correspondence metric `name` (pck@1, epe, mass1,
    pck@1/<bin>, ...) of one attention layer; `layer = SUPERVISED_LAYER` for the supervised layer's copy."""
    return f"{ATTN}{layer}/{name}"


def attn_prefix(layer: str) -> str:
    return f"{ATTN}{layer}/"


PCK1 = "pck@1"  # attention metric: share of queries whose attention peak lies within 1 token of the truth
EPE = "epe"  # attention metric: end-point error of the attention peak, in tokens
MASS1 = "mass1"  # attention metric: softmax mass within 1 token of the truth


def pck(threshold: float) -> str:
    """`pck@0.5`, `pck@1`, `pck@2`: share of queries whose attention peak lies within `threshold` tokens."""
    return f"pck@{threshold:g}"


SUPERVISED_PREFIX = attn_prefix(SUPERVISED_LAYER)
SUPERVISED_PCK1 = attn(SUPERVISED_LAYER, "pck@1")
SUPERVISED_EPE = attn(SUPERVISED_LAYER, "epe")
# the headline copy of the supervised layer's PCK@1: sorts with eval/psnr, not with the diagnostics
PCK_SUPERVISED = "eval/pck_supervised"

# Sparse truths of the attention metrics (evaluation/attention.py): without dense depth, PCK/EPE are
# measured against SfM tracks or SIFT matches, under names that say so; depth keeps the bare names.
TRUTH_TRACKS = "sfm_tracks"
TRUTH_MATCHES = "matches"


def attn_truth(source: str, name: str) -> str:
    """`<source>/<name>` (e.g. `sfm_tracks/pck@1`, `matches/count/0-30`): an attention metric name
    measured against a sparse truth; use inside `attn(layer, ...)`."""
    return f"{source}/{name}"


# Metric conventions and metrics that could not be computed (evaluation/protocol.py, metrics.py)


def eval_convention(name: str) -> str:
    """`eval.convention.<name>` (psnr, ssim, lpips, preprocess, index, attention_truth): a tag or
    param naming how an evaluation's numbers were computed, so a report can state it."""
    return f"eval.convention.{name}"


def not_computed(metric: str) -> str:
    """`not_computed.<metric>` (e.g. `not_computed.eval/lpips_vgg`): a tag whose value says why the
    metric was not logged (no weights, no depth, ...). A metric that cannot be computed is never
    logged as NaN. A prefix (`eval/floor/`: every floor) loses its trailing slash, which MLflow
    refuses in a key (`not_computed.eval/floor`)."""
    return f"not_computed.{metric.rstrip('/')}"


EVAL_JSON_CONVENTIONS = "conventions"  # eval.json field: {psnr, ssim, lpips, preprocess, ...} -> name
EVAL_JSON_NOT_COMPUTED = "not_computed"  # eval.json field: metric -> why it is absent


def perturb_metric(layer: str, name: str) -> str:
    """`perturb/<layer>/<name>` (and `perturb/base/<name>`) of the identity-attention analysis."""
    return f"perturb/{layer}/{name}"


PERTURB_BASE = "base"  # perturb/base/<metric>: the unperturbed model's value
DROP = "_drop"  # perturb/<layer>/<metric>_drop: the metric's fall with that layer's attention set to identity


# --- params (the flattened experiment spec is `section.field`) --------------------------------
CAMEO_WEIGHT = "cameo.weight"
CAMEO_SOURCE = "cameo.source"
CAMEO_LAYER = "cameo.layer"
CAMEO_PREFIX = "cameo."
BACKBONE_NAME = "backbone.name"
BACKBONE_PRESET = "backbone.preset"
SEED = "seed"
EXPERIMENT_NAME = "name"  # run_experiment.name (the run folder's name)
OUTPUT_DIR = "output_dir"
TRAIN_PROGRESS = "train.progress"
TRAIN_STEPS = "train.steps"
# params that say where a run lives and whether it drew a progress bar, not what it trained
PLACEMENT_PARAMS = (EXPERIMENT_NAME, OUTPUT_DIR, TRAIN_PROGRESS)
BACKBONE_PREFIX = "backbone."
DATA_PREFIX = "data."

# --- tags ---------------------------------------------------------------------------------------
LAYER_RESOLVED = "cameo.layer_resolved"  # tag: the layer name a selector such as `depth:0.5` resolved to
ATTN_LAYERS = "attn.layers"  # tag: every attention layer, comma-separated, in forward order
VARIANT = "variant"
BACKBONE = "backbone"
PRESET = "preset"
WORLD_SIZE = "world_size"
COMMAND = "command"
ERROR = "error"
GIT_SHA = "git.sha"
GIT_DIRTY = "git.dirty"
RUN_NAME = "mlflow.runName"
PARENT_RUN_ID = "mlflow.parentRunId"
SWEEP_NAME = "sweep.name"
SWEEP_ROLE = "sweep.role"
SWEEP_TRIAL = "sweep.trial"
SWEEP_LABEL = "sweep.label"
SWEEP_CODE = "sweep.code"  # tag: the copy of the code a local sweep's workers ran (sweep/code_snapshot.py)
REUSED_FROM = "reused_from"  # tag of a sweep trial copied from a finished run of the same configuration
REUSED_FROM_EXPERIMENT = "reused_from.experiment"
CHECKPOINT_PATH = "checkpoint.path"
RUN_DIR = "run_dir"
GPU_TYPE = "gpu_type"
HOST = "host"
PYTHON = "python"
DEVICE = "device"
GIN_FILES = "gin_files"  # read by the report's sources.json (as a param or a tag)
# the columns to group and filter a runs table by (every run, CLI and sweep trial alike): a baseline
# has `lambda = 0` and `layer = source = none`, never a sibling arm's values
LAYER = "layer"
LAMBDA = "lambda"
SOURCE = "source"
NONE = "none"  # the value of every `cameo.*` param but the weight, and of these tags, in a baseline


def version_tag(package: str) -> str:
    return f"version.{package}"


# --- files (run folder and MLflow artifacts) ---------------------------------------------------


def figures_folder(step: int) -> str:
    """`figures/step_0000250`: where the figures of one evaluation go."""
    return f"figures/step_{step:07d}"


def figure_key(file_name: str) -> str:
    """`figures/samples` for `samples.png`: the MLflow image key of a figure (`log_image(key=, step=)`),
    which the UI shows by step in its chart view and on the compare page."""
    return "figures/" + file_name.rsplit(".", 1)[0]


RUN_CONFIG = "config.gin"  # operative gin config in the run folder
RUN_COMMAND = "command.json"
RUN_TRIAL = "trial.json"
EVAL_JSON = "eval.json"
METRICS_FILE = "metrics.jsonl"
PARAMS_FILE = "params.json"
STATUS_FILE = "status.json"
RUN_ID_FILE = "mlflow_run_id"  # in the run folder: the MLflow run a resumed training continues
ARTIFACT_RAW_CONFIG = "config/raw.gin"
ARTIFACT_OPERATIVE_CONFIG = "config/operative.gin"
ARTIFACT_COMMAND = "config/command.json"
ARTIFACT_TRIAL = "config/trial.json"
ARTIFACT_ERROR = "error.txt"
ARTIFACT_SWEEP_FILE = "sweep/sweep.gin"
ARTIFACT_SWEEP_TRIALS = "sweep/trials.json"
SAMPLES_FIGURE = "samples.png"
ATTENTION_FIGURE = "attention.png"

