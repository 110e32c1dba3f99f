"""`python -m raysnet.reaper PID`: when process PID ends, however it ends, end what it had started.

A driver that starts a Ray of its own (no RAY_ADDRESS) starts a dozen processes; killed with
SIGKILL it cannot stop them, and Ray's agents (DashboardAgent, RuntimeEnvAgent) were seen to outlive
it, re-parented to PID 1. This watcher, a process of its own started beside the driver, notes the
driver's descendants every second while it lives and, once it is gone, terminates the ones still
there (then kills those that ignore SIGTERM), each checked by its start time, never a reused pid.
"""

from __future__ import annotations

import os
import sys
import time

import psutil

POLL_S = 1.0
GRACE_S = 3.0


def watch(pid: int) -> list[psutil.Process]:
    """Wait for `pid` to end. -> its descendants, every one seen while it lived"""
    seen: dict[int, psutil.Process] = {}
    try:
        driver = psutil.Process(pid)
        while driver.status() != psutil.STATUS_ZOMBIE:
            for child in driver.children(recursive=True):
                if child.pid != os.getpid():  # this watcher is the driver's child too
                    seen.setdefault(child.pid, child)
            time.sleep(POLL_S)
    except psutil.NoSuchProcess:
        pass
    return list(seen.values())


def end(processes: list[psutil.Process]) -> None:
    """SIGTERM to each still running (is_running compares start times), SIGKILL after GRACE_S."""
    alive = [p for p in processes if p.is_running()]
    for p in alive:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, left = psutil.wait_procs(alive, timeout=GRACE_S)
    for p in left:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def start(pid: int) -> None:
    """Start a watcher of `pid` (this process, normally) in a session of its own, so that a Ctrl-C
    or a kill of the driver's process group does not stop it first."""
    import subprocess

    subprocess.Popen([sys.executable, "-m", "raysnet.reaper", str(pid)], stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)


if __name__ == "__main__":
    end(watch(int(sys.argv[1])))
