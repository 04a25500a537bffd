"""A server as one process group that is stopped whole: started in its own session, signalled by group.

`mlflow ui` is a tree: the CLI process, the uvicorn server and its workers, and huey task consumers.
Terminating only the process we started leaves the rest serving, re-parented to PID 1 (seen with
the old launcher, whose SIGTERM killed it before its cleanup ran). So the server gets its own
session (its pid is the group id), the launcher stops it with `killpg` (SIGTERM, then SIGKILL after
a grace period), and on Linux the server's leader also gets SIGTERM if the launcher dies without
cleaning up (`PR_SET_PDEATHSIG`). Standard library only; POSIX.
"""
from __future__ import annotations

import ctypes
import os
import pathlib
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask Linux to send `sig` to this process when its parent dies; False where unsupported
    (other systems: callers also poll `os.getppid()`)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def start_group(cmd: list[str], **popen) -> subprocess.Popen:
    """`cmd` as the leader of a new session and process group (group id = its pid), which gets
    SIGTERM if this process dies first."""
    launcher = os.getpid()

    def in_child() -> None:  # runs in the child between fork and exec
        die_with_parent(signal.SIGTERM)
        if os.getppid() != launcher:  # the launcher died before the request took effect
            os._exit(1)

    return subprocess.Popen(cmd, start_new_session=True, preexec_fn=in_child, **popen)


def group_members(pgid: int) -> list[int]:
    """Pids of the live processes in group `pgid` (from /proc; empty where there is no /proc).
    Zombies count as gone: they serve nothing and vanish when reaped."""
    members = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2:].split()  # after "pid (comm) ": state, ppid, pgrp, ...
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def _signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to the whole group of `proc` (started by `start_group`), SIGKILL to whatever is
    left after `grace` seconds; `proc` is reaped. Safe to call twice."""
    pgid = proc.pid
    if _signal_group(pgid, signal.SIGTERM):
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader, or it stays a zombie member
            if not group_members(pgid) and proc.returncode is not None:
                break
            time.sleep(0.1)
        _signal_group(pgid, signal.SIGKILL)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
