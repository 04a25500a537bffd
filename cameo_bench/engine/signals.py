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


def on_sigterm(signum, frame):
    _received.set()
    raise Terminated(f"signal {signum}")


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
