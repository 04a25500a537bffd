"""SIGTERM as an interrupt, for a training process and for the sweep that runs several.

Slurm's time limit, a scheduler's preemption and a plain `kill` send SIGTERM, whose default action
ends the process at once: a run would stay RUNNING forever in MLflow with its last steps unflushed,
and a sweep's parent would die leaving its workers training on as orphans. Raising `Terminated`
(a KeyboardInterrupt) instead runs the same clean-up as Ctrl-C. Standard library only, so the sweep
parent can install it without importing torch.
"""
from __future__ import annotations

import contextlib
import signal
import threading


class Terminated(KeyboardInterrupt):
    """SIGTERM (Slurm's time limit, a scheduler's preemption) as an interrupt, so the run is
    flushed and marked KILLED instead of vanishing while RUNNING."""


_received = threading.Event()  # set by the handler: clean-up code far from where it was raised can ask
_deferring = 0  # depth of `sigterm_deferred` blocks on the main thread (the handler runs there)
_pending: int | None = None  # the signal that arrived inside one, raised when the outermost ends


def on_sigterm(signum, frame):
    global _pending
    _received.set()
    if _deferring:
        _pending = signum
        return
    raise Terminated(f"signal {signum}")


@contextlib.contextmanager
def sigterm_deferred():
    """Hold a SIGTERM that arrives in the block until the block is done, then raise it (chained to
    the block's own error if it ends with one: the run was stopped either way).

    Why: `Terminated` raised inside `torch.save` breaks its zip writer, whose clean-up then raises
    a RuntimeError ("unexpected pos") that replaces the interrupt; the run ended FAILED instead of
    KILLED (seen in the sweep SIGTERM test under load, with a checkpoint every 2 steps). Holding
    the signal lets the write finish; should a SIGKILL follow first (Slurm's grace period, on a
    paper-scale checkpoint), the temp-file-then-rename write keeps the previous checkpoint.
    """
    global _deferring, _pending
    _deferring += 1
    error = None
    try:
        yield
    except BaseException as err:
        error = err
        raise
    finally:
        _deferring -= 1
        if not _deferring and _pending is not None:  # stopped all the same: KILLED, with the block's error if any
            signum, _pending = _pending, None
            held = f"while {type(error).__name__}: {error}" if error is not None else "until the block was done"
            raise Terminated(f"signal {signum}, held {held}") from error


def interrupted(err: BaseException) -> bool:
    """Whether `err` is an interrupt (Ctrl-C, `Terminated`) or was raised while one was handled:
    a run stopped from outside ends KILLED even when clean-up code turned the interrupt into
    another error on the way."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KeyboardInterrupt):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def sigterm_received() -> bool:
    """Whether this process was sent SIGTERM while `sigterm_as_interrupt` was active (the exception
    may surface elsewhere, e.g. in the consumer of a generator whose clean-up needs to know)."""
    return _received.is_set()


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Turn SIGTERM into `Terminated` while the block runs, if this thread may install handlers and
    nobody else did; the default is put back afterwards (an in-process sweep trial runs many)."""
    installed = (threading.current_thread() is threading.main_thread()
                 and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)
    if installed:
        _received.clear()
        signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
