"""SIGTERM during a checkpoint write: held until the file is whole, then the run is interrupted (KILLED)."""
from __future__ import annotations

import os
import signal

import pytest
import torch

from cameo_bench.engine import checkpoint
from cameo_bench.engine.signals import Terminated, interrupted, sigterm_as_interrupt, sigterm_deferred


def test_a_sigterm_inside_a_deferred_block_is_raised_when_it_ends():
    done = []
    with sigterm_as_interrupt():
        with pytest.raises(Terminated, match="held until"):
            with sigterm_deferred():
                with sigterm_deferred():  # nested: only the outermost raises
                    os.kill(os.getpid(), signal.SIGTERM)
                done.append("inner")
                done.append("outer")
        assert done == ["inner", "outer"]
        with sigterm_deferred():  # nothing pending any more
            pass
        with pytest.raises(Terminated):  # outside a deferred block it interrupts at once
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(10**6):  # the handler runs between bytecodes
                pass


def test_a_held_signal_is_raised_with_the_blocks_own_error_as_its_cause():
    with sigterm_as_interrupt():
        with pytest.raises(Terminated, match="ValueError") as caught:
            with sigterm_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                raise ValueError("the block's own error")
        assert isinstance(caught.value.__cause__, ValueError)
        with sigterm_deferred():  # the signal was raised once, not held for a later block
            pass
        with pytest.raises(ValueError):  # without a signal the error passes unchanged
            with sigterm_deferred():
                raise ValueError("no signal")


def test_a_checkpoint_written_under_sigterm_is_whole_and_the_run_is_interrupted(tmp_path, monkeypatch):
    real_save = torch.save

    def save_hit_halfway(obj, fh):  # the signal arrives while torch writes the zip
        os.kill(os.getpid(), signal.SIGTERM)
        real_save(obj, fh)

    monkeypatch.setattr(torch, "save", save_hit_halfway)
    payload = {"step": 7, "weights": torch.arange(1000.0)}
    path = tmp_path / "checkpoints" / "latest.pt"
    with sigterm_as_interrupt():
        with pytest.raises(Terminated):
            checkpoint.save(path, payload)
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 7 and torch.equal(loaded["weights"], payload["weights"])
    assert [p.name for p in path.parent.iterdir()] == ["latest.pt"]  # no temp file left


def test_an_error_raised_while_an_interrupt_was_handled_counts_as_interrupted():
    try:
        try:
            raise Terminated("signal 15")
        except Terminated:
            raise RuntimeError("unexpected pos 517376 vs 517268")  # what torch's zip writer raised
    except RuntimeError as err:
        assert interrupted(err)
    assert interrupted(KeyboardInterrupt()) and not interrupted(RuntimeError("a real error"))
    cause = ValueError("x")
    cause.__context__ = cause  # a cycle ends the walk
    assert not interrupted(cause)
