"""Process-tree checks for signal tests: who a process started, and waiting (bounded) for them to go."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import psutil


def descendants(pid: int) -> list[psutil.Process]:
    """The process and everything it started (hivemind's DHT child, p2pd, torch_shm_manager)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running (zombies count as gone: only their parent's wait is missing)."""
    left = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                left.append(process)
    return left


def group_members(pgid: int) -> list[int]:
    members = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process.pid)
    return members


def wait_gone(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until none of `processes` runs; returns those left after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    left = alive(processes)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = alive(processes)
    return left


def describe(processes: list[psutil.Process]) -> str:
    lines = []
    for process in processes:
        with contextlib.suppress(psutil.Error):
            lines.append(f"{process.pid} {' '.join(process.cmdline())[:160]}")
    return "; ".join(lines)


def kill_all(processes: list[psutil.Process]) -> None:
    """Cleanup after a failed test: nothing it started may outlive it."""
    for process in alive(processes):
        with contextlib.suppress(psutil.Error, OSError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(psutil.Error):
            process.kill()
