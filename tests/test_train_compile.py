"""`train.compile = True`: the engine compiles the backbone's forward, and a compiled run trains like an eager one.

Compiled kernels round differently from eager ones, so the losses are compared with a tolerance,
not bit for bit. The speed (and the compile time, minutes on a CPU) is measured in
tests/benchmarks/test_bench_train_step.py::test_compiled_step, not here.
"""
from __future__ import annotations

import pytest
import torch

from cameo_bench import config
from cameo_bench.config.spec import SpecError, TrainSpec


def micro_run(tmp_path, compile_: bool):
    from cameo_bench.engine.build import build_run

    exp = config.parse(["gin/experiments/smoke.gin"], [
        f"run_experiment.output_dir = '{tmp_path}'", f"run_experiment.name = 'compile_{compile_}'",
        "train.progress = False", "eval.every = 0", "train.checkpoint_every = 0", f"train.compile = {compile_}"])
    return build_run(exp)


def test_compile_is_a_checked_train_field():
    assert TrainSpec().compile is False
    assert TrainSpec(compile=True).compile is True
    with pytest.raises(SpecError, match="compile"):
        TrainSpec(compile="yes")


@pytest.mark.slow  # inductor compiles the micro DiT: ~75 s cold on 2 shared cores, ~16 s with its cache warm
def test_compiled_micro_run_trains_like_eager(tmp_path):
    from cameo_bench.engine.step import train_step

    torch.set_num_threads(1)
    runs = {flag: micro_run(tmp_path, flag) for flag in (False, True)}
    assert runs[True].model._compiled_call_impl is not None and runs[False].model._compiled_call_impl is None
    assert runs[True].model.state_dict().keys() == runs[False].model.state_dict().keys()  # checkpoints unchanged
    before = [p.detach().clone() for p in runs[True].model.parameters()]
    history = {flag: [train_step(run, step) for step in range(3)] for flag, run in runs.items()}
    for eager, compiled in zip(history[False], history[True], strict=True):
        for key in ("train/loss_diffusion", "train/loss_cameo", "train/grad_norm"):
            assert compiled[key] == pytest.approx(eager[key], rel=1e-4, abs=1e-6), key
    moved = [not torch.equal(a, b.detach()) for a, b in zip(before, runs[True].model.parameters())]
    assert any(moved)  # the compiled run really trained
