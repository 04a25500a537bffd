"""DDP under torchrun: 2 gloo ranks on CPU train exactly like one process with the same global batch.

The reference is always an ordinary single-process run of the same experiment (no process group),
never the distributed code compared with itself. One torchrun launch (~5 s of process start on an
idle machine) runs every distributed case in sequence; this file is also the worker script it runs
(`python -m torch.distributed.run --standalone --nproc_per_node=2 tests/test_ddp.py ROOT`).

Cases: micro DiT with CAMEO, mean head (through the `cameo-bench train` CLI, with eval and rank-0
logging) and MLP head with gradient accumulation (`no_sync`); resume 1 -> 2 ranks and 2 -> 1; a
non-finite loss on one rank only is skipped by every rank.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import traceback

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
SMOKE = REPO / "gin/experiments/smoke.gin"
# warmup 0 and lr 1e-3: Adam's first update is ~lr per parameter, so 1e-5 separates "same
# gradients" from "different noise" by two orders of magnitude.
BASE = ["train.progress = False", "eval.every = 0", "data.batch_size = 4", "train.log_every = 1",
        "train.checkpoint_every = 1", "optim.warmup_steps = 0", "optim.lr = 1e-3"]
MEAN = [*BASE, "cameo.head = 'mean'"]
MLP = [*BASE, "cameo.head = 'mlp'", "optim.grad_accum = 2", "cameo.queries_per_view = 8"]
NAN_STEP, NAN_RANK = 0, 1
TOL = 1e-5
# The key LayerNorm's bias only shifts every logit of a softmax row by the same amount (it adds q.b
# to a query's row), which softmax ignores. Its exact gradient is 0 and the computed one is rounding
# noise (~1e-9, vs ~1e-2 elsewhere). Adam divides that noise by its own size, so it moves by up to
# ~lr in a direction set by summation order, in any two runs that sum differently, distributed or
# not. It is compared at lr scale. (The MLP head's output layer has no bias for the same reason.)
SOFTMAX_INVARIANT = ("attn.norm_k.bias",)


def experiment(out: pathlib.Path, bindings: list[str], steps: int):
    from cameo_bench import config
    return config.parse([SMOKE], [f"run_experiment.output_dir = '{out}'", *bindings, f"train.steps = {steps}"])


def poison(run, rank: int | None) -> None:
    """NaN diffusion loss at NAN_STEP (on `rank` only when given)."""
    original = run.diffusion.training_loss

    def poisoned(*args, **kwargs):
        loss, aux = original(*args, **kwargs)
        hit = run.state.step == NAN_STEP and (rank is None or run.dist.rank == rank)
        return (loss * float("nan") if hit else loss), aux

    run.diffusion.training_loss = poisoned


def params_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for value in model.state_dict().values():
        digest.update(value.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# the worker (runs on every rank under torchrun)


def worker(root: pathlib.Path) -> int:
    from cameo_bench.engine import distributed, loop
    from cameo_bench.__main__ import main
    from cameo_bench.engine.build import build_run

    rank = int(os.environ["RANK"])
    loop.fit(build_run(experiment(root / "ddp_mlp", MLP, 3)))
    loop.fit(build_run(experiment(root / "ddp_resume", MEAN, 3), resume=True))  # 1 -> 2 ranks
    run = build_run(experiment(root / "ddp_nan", [*MEAN, "train.nonfinite = 'skip'"], 2))
    poison(run, NAN_RANK)
    loop.fit(run)
    (root / f"done_rank{rank}.json").write_text(json.dumps(
        {"skipped": run.state.skipped_steps, "digest": params_digest(run.model)}))

    evaluate = loop.evaluate_run

    def recorded(run, *args, **kwargs):
        (root / f"evaluated_rank{rank}").touch()
        return evaluate(run, *args, **kwargs)

    loop.evaluate_run = recorded
    # MLflow under torchrun is cameo_bench.tracking's to test; here only the run folder is checked
    args = ["train", str(SMOKE), "--no-progress", "--no-tracking",
            "--gin_param", f"run_experiment.output_dir = '{root / 'ddp_cli'}'"]
    for binding in [*MEAN, "train.steps = 2", "eval.every = 2"]:
        args += ["--gin_param", binding]
    code = main(args)  # the CLI may end the process itself (distributed.shutdown)
    return distributed.shutdown(code)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    try:
        exit_code = worker(pathlib.Path(sys.argv[1]))
    except Exception:
        traceback.print_exc()
        from cameo_bench.engine import distributed
        exit_code = distributed.shutdown(1)
    sys.exit(exit_code)


# ---------------------------------------------------------------------------------------------
# the tests


def single(out: pathlib.Path, bindings: list[str], steps: int, resume: bool = False, nan: bool = False):
    """A plain one-process run; returns its final parameters."""
    from cameo_bench.engine.build import build_run
    from cameo_bench.engine.loop import fit

    run = build_run(experiment(out, bindings, steps), resume=resume)
    if nan:
        poison(run, None)
    fit(run)
    return {k: v.clone() for k, v in run.model.state_dict().items()}, run


def final_params(out: pathlib.Path) -> dict[str, torch.Tensor]:
    from cameo_bench.engine import checkpoint
    return checkpoint.load(out / "smoke" / "checkpoints")["model"]


def max_diff(a: dict, b: dict, steps: int = 3) -> float:
    """Largest difference over the parameters with a real gradient; the softmax-invariant ones
    only have to stay within Adam's per-step bound."""
    assert a.keys() == b.keys()
    diffs = {k: float((a[k].double() - b[k].double()).abs().max()) for k in a}
    noisy = [k for k in a if k.endswith(SOFTMAX_INVARIANT)]
    assert all(diffs[k] <= 2e-3 * steps for k in noisy), {k: diffs[k] for k in noisy}
    return max(v for k, v in diffs.items() if k not in noisy)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    ref = {
        "mean2": single(root / "mean2", MEAN, 2)[0],
        "mean3": single(root / "mean3", MEAN, 3)[0],
        "mlp3": single(root / "mlp3", MLP, 3)[0],
        "nan2": single(root / "nan2", [*MEAN, "train.nonfinite = 'skip'"], 2, nan=True),
    }
    shutil.copytree(root / "mean2", root / "ddp_resume")  # resumed by 2 ranks

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(pathlib.Path(__file__).resolve()), str(root)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:  # a rank waiting on a collective forever: kill the whole launch
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun hung (ranks disagree on a collective?):\n{output[-4000:]}")
    assert proc.returncode == 0, output[-6000:]
    return root, ref, output


@pytest.mark.slow
def test_two_ranks_equal_one_process_mean_head_through_cli(runs):
    root, ref, _ = runs
    diff = max_diff(final_params(root / "ddp_cli"), ref["mean2"])
    moved = max_diff(ref["mean3"], ref["mean2"])  # one step moves parameters by ~lr
    assert diff < TOL < moved / 10, (diff, moved)


@pytest.mark.slow
def test_two_ranks_equal_one_process_mlp_head_with_grad_accumulation(runs):
    from cameo_bench.engine import checkpoint
    root, ref, _ = runs
    assert max_diff(final_params(root / "ddp_mlp"), ref["mlp3"]) < TOL
    head = checkpoint.load(root / "ddp_mlp" / "smoke" / "checkpoints")["cameo_head"]
    single_head = checkpoint.load(root / "mlp3" / "smoke" / "checkpoints")["cameo_head"]
    assert head.keys() and max_diff(head, single_head) < TOL  # the head is all-reduced too


@pytest.mark.slow
def test_resume_on_a_different_world_size(runs, tmp_path):
    root, ref, _ = runs
    # 1 -> 2: a single-process checkpoint at step 2 continued by 2 ranks to step 3
    assert max_diff(final_params(root / "ddp_resume"), ref["mean3"]) < TOL
    # 2 -> 1: the 2-rank CLI run's step-2 checkpoint continued by one process
    shutil.copytree(root / "ddp_cli", tmp_path / "resumed")
    resumed, _ = single(tmp_path / "resumed", MEAN, 3, resume=True)
    assert max_diff(resumed, ref["mean3"]) < TOL


@pytest.mark.slow
def test_nonfinite_on_one_rank_is_skipped_by_all(runs):
    root, ref, _ = runs
    done = [json.loads((root / f"done_rank{r}.json").read_text()) for r in (0, 1)]
    assert done[0]["digest"] == done[1]["digest"]  # ranks never diverge
    assert done[0]["skipped"] == done[1]["skipped"] == 1
    params, run = ref["nan2"]
    assert run.state.skipped_steps == 1
    assert max_diff(final_params(root / "ddp_nan"), params) < TOL


@pytest.mark.slow
def test_rank_zero_logs_evaluates_and_checkpoints(runs):
    from cameo_bench.tracking.run_log import read_metrics

    root, _, _ = runs
    run = root / "ddp_cli" / "smoke"
    assert (root / "evaluated_rank0").exists() and not (root / "evaluated_rank1").exists()
    history = read_metrics(run)
    assert [s for s, _ in history["train/loss_diffusion"]] == [1, 2]  # one writer
    assert [s for s, _ in history["eval/psnr"]] == [2]
    assert json.loads((run / "status.json").read_text())["status"] == "FINISHED"
    assert (run / "config.gin").exists()
    # logged losses are the global-batch values: equal to the single-process run's
    single_history = read_metrics(root / "mean2" / "smoke")
    for key in ("train/loss_diffusion", "train/loss_cameo"):
        for (_, a), (_, b) in zip(history[key], single_history[key], strict=True):
            assert a == pytest.approx(b, rel=1e-5, abs=1e-6), key


def test_batch_must_divide_by_world_size(tmp_path, monkeypatch):
    from cameo_bench.engine import build, distributed
    from cameo_bench.engine.distributed import DistInfo

    monkeypatch.setattr(distributed, "init_distributed", lambda device=None: (DistInfo(0, 3, 0), torch.device("cpu")))
    with pytest.raises(build.ExperimentError, match="batch_size 4 not divisible by world size 3"):
        build.build_run(experiment(tmp_path, MEAN, 1))


def test_sample_draws_do_not_depend_on_the_split(tmp_path):
    """The draws of global sample p are the same whether one rank holds positions 0-3 or two
    ranks hold 0-1 and 2-3."""
    from cameo_bench.data.batch import collate
    from cameo_bench.engine.build import build_run
    from cameo_bench.engine.step import draw

    run = build_run(experiment(tmp_path, MEAN, 1))
    batch = collate([run.train_set[i] for i in range(4)])
    whole = draw(run, batch, 5, range(0, 4))
    halves = [draw(run, {**batch, "image": batch["image"][s]}, 5, range(s.start, s.stop))
              for s in (slice(0, 2), slice(2, 4))]
    for name in ("t", "camera_drop", "noise"):
        assert torch.equal(getattr(whole, name), torch.cat([getattr(h, name) for h in halves])), name
    other = draw(run, batch, 6, range(0, 4))
    assert not torch.equal(whole.noise, other.noise)
    assert not torch.equal(whole.noise[0], whole.noise[1])
