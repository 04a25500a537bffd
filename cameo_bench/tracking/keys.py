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
ATTN = "attn/"
TIME = "time/"
PERTURB = "perturb/"

# --- training ---------------------------------------------------------------------------------
GRAD_NORM = "train/grad_norm"
LR = "train/lr"
SKIPPED_STEPS = "train/skipped_steps"
CAMEO_PAIRS_REF = "train/cameo_pairs_ref"
CAMEO_PAIRS_TGT = "train/cameo_pairs_tgt"
SUMMED_OVER_RANKS = (CAMEO_PAIRS_REF, CAMEO_PAIRS_TGT)  # counts add up over DDP ranks; the rest are means
STEP_SECONDS = "time/step_seconds"
TRAIN_SECONDS = "time/train_seconds"


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


def eval_by_bin(name: str, bin_name: str) -> str:
    """`eval/<metric>/<viewpoint bin>` (e.g. `eval/psnr/0-30`), and `eval/count/<bin>`."""
    return f"eval/{name}/{bin_name}"


COUNT = "count"  # per viewpoint bin: how many images (eval/) or query tokens (attn/) fell into it


def in_bin(name: str, bin_name: str) -> str:
    """`<name>/<viewpoint bin>` (e.g. `pck@1/0-30`, `count/90+`): the per-bin form of a metric name."""
    return f"{name}/{bin_name}"


SUPERVISED_LAYER = "supervised"  # the alias under which the supervised layer's attention metrics repeat


def attn(layer: str, name: str) -> str:
    """`attn/<layer>/<name>`: attention-correspondence metric `name` (pck@1, epe, mass1, pck@1/<bin>, ...)
    of one attention layer; `layer = SUPERVISED_LAYER` for the supervised layer's copy."""
    return f"attn/{layer}/{name}"


def attn_prefix(layer: str) -> str:
    return f"attn/{layer}/"


PCK1 = "pck@1"  # attention metric: share of queries whose attention peak lies within 1 token of the truth
EPE = "epe"  # attention metric: end-point error of the attention peak, in tokens
MASS1 = "mass1"  # attention metric: softmax mass within 1 token of the truth


def pck(threshold: float) -> str:
    """`pck@0.5`, `pck@1`, `pck@2`: share of queries whose attention peak lies within `threshold` tokens."""
    return f"pck@{threshold:g}"


SUPERVISED_PREFIX = attn_prefix(SUPERVISED_LAYER)
SUPERVISED_PCK1 = attn(SUPERVISED_LAYER, "pck@1")
SUPERVISED_EPE = attn(SUPERVISED_LAYER, "epe")


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
CHECKPOINT_PATH = "checkpoint.path"
RUN_DIR = "run_dir"
GPU_TYPE = "gpu_type"
HOST = "host"
PYTHON = "python"
DEVICE = "device"
GIN_FILES = "gin_files"  # read by the report's sources.json (as a param or a tag)


def version_tag(package: str) -> str:
    return f"version.{package}"


# --- files (run folder and MLflow artifacts) ---------------------------------------------------


def figures_folder(step: int) -> str:
    """`figures/step_0000250`: where the figures of one evaluation go."""
    return f"figures/step_{step:07d}"


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

