"""`cameo-bench eval RUN_DIR|CHECKPOINT [--perturb] [--gin_param ...]`: evaluate a trained run.

The run folder holds the operative gin config written at training time, so the experiment (data,
backbone, diffusion settings) is rebuilt exactly; bindings given here override it (e.g. more
eval scenes or sampler steps). Evaluation only adds `eval.json` (or `--output`): it never deletes
or truncates anything the training wrote.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a run folder or a checkpoint file inside <run>/checkpoints/")
    parser.add_argument("--gin_param", "--gin-param", action="append", default=[])
    parser.add_argument("--perturb", action="store_true",
                        help="also measure the quality drop when each layer's attention is replaced by identity")
    parser.add_argument("--output", default=None, help="write metrics JSON here (default: <run>/eval.json)")


def run(args: argparse.Namespace) -> int:
    from cameo_bench import config
    from cameo_bench.engine import checkpoint
    from cameo_bench.engine.build import build_run
    from cameo_bench.engine.loop import evaluate_run
    from cameo_bench.evaluation.evaluate import perturbation_analysis
    from cameo_bench.evaluation.protocol import conventions_record
    from cameo_bench.tracking import keys

    path = pathlib.Path(args.checkpoint)
    run_dir = path if path.is_dir() else path.parent.parent
    ckpt_file = path if path.is_file() else checkpoint.latest_path(run_dir)
    gin_file = run_dir / keys.RUN_CONFIG
    if not gin_file.exists():
        print(f"error: {gin_file} not found; is {run_dir} a cameo-bench run folder?", file=sys.stderr)
        return 2
    exp = config.parse([gin_file], args.gin_param)
    exp.output_dir, exp.name = str(run_dir.parent), run_dir.name
    exp.train.progress = False
    run = build_run(exp)  # writes nothing: the run folder's log, configs and checkpoints stay as trained
    checkpoint.load_into(run, checkpoint.load(ckpt_file))
    batches = list(run.eval_batches())
    omitted: dict[str, str] = {}
    metrics = evaluate_run(run, batches, omitted=omitted)
    if args.perturb:
        metrics.update(perturbation_analysis(run.eval_model, run.diffusion, batches, exp.eval, seed=exp.seed))
    metrics["step"] = run.state.step
    # how the numbers were computed, and what could not be (a report states both)
    metrics[keys.EVAL_JSON_CONVENTIONS] = conventions_record(exp)
    metrics[keys.EVAL_JSON_NOT_COMPUTED] = omitted
    out = pathlib.Path(args.output) if args.output else run_dir / keys.EVAL_JSON
    out.write_text(json.dumps(metrics, indent=1, sort_keys=True))
    print(json.dumps(metrics, indent=1, sort_keys=True))
    return 0
