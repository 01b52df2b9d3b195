"""Supervising the block server: a child process (a fresh interpreter: spawn, never fork), its states and
their reasons, and restarts with backoff after a crash. `poll()` is called about once a second."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from corolla.executable import corolla_command
from corolla.swarm.server.stats import read_stats

logger = logging.getLogger(__name__)
MAX_BACKOFF_S = 60.0
HEALTHY_AFTER_S = 300.0  # running this long clears the failure count


def restart_delay(failures: int) -> float:
    """1, 2, 4, ... 60 s after the 1st, 2nd, 3rd ... consecutive crash."""
    return min(2.0 ** max(failures - 1, 0), MAX_BACKOFF_S)


@dataclass
class SupervisorStatus:
    state: str  # stopped | starting | loading | online | paused | restarting | failed
    reason: str
    pid: int | None
    restarts: int
    stats: dict | None
    last_failure: str | None = None


class ServerSupervisor:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.stats_path = workdir / "server-stats.json"
        self.log_path = workdir / "server.log"
        self.process: subprocess.Popen | None = None
        self.args: list[str] | None = None
        self.wanted = False
        self.state, self.reason = "stopped", "not started"
        self.failures = 0
        self.restarts = 0
        self.last_failure: str | None = None
        self.next_start_at: float | None = None
        self.started_at = 0.0
        self.pid_path = workdir / "server.pid"
        self._reap_orphan()

    def _reap_orphan(self) -> None:
        """A server left running by a node that was killed: stop it before starting a new one."""
        try:
            pid = int(self.pid_path.read_text())
            process = psutil.Process(pid)
            if "corolla.cli" in " ".join(process.cmdline()) and "serve" in process.cmdline():
                logger.warning("stopping block server %d left by a previous node", pid)
                process.terminate()
                try:
                    process.wait(20)
                except psutil.TimeoutExpired:
                    os.killpg(pid, signal.SIGKILL)
        except (FileNotFoundError, ValueError, psutil.Error, ProcessLookupError):
            pass
        self.pid_path.unlink(missing_ok=True)

    # --- control -----------------------------------------------------------------------------------
    def start(self, args: list[str]) -> None:
        """Run `corolla serve ARGS` (replacing a running server if the arguments changed)."""
        if self.process is not None and self.process.poll() is None and args == self.args:
            self.wanted = True
            return
        self._terminate()
        self.args, self.wanted, self.failures = list(args), True, 0
        self._spawn()

    def stop(self, reason: str = "stopped by the user") -> None:
        self.wanted = False
        self._terminate()
        self.state, self.reason, self.next_start_at = "stopped", reason, None

    def pause(self, reason: str) -> None:
        self.wanted = False
        self._terminate()
        self.state, self.reason, self.next_start_at = "paused", reason, None

    def resume(self) -> None:
        if self.args is not None and (self.process is None or self.process.poll() is not None):
            self.wanted = True
            self._spawn()

    # --- status ------------------------------------------------------------------------------------
    def poll(self) -> SupervisorStatus:
        now = time.monotonic()
        if self.process is not None and self.process.poll() is not None:
            code = self.process.returncode
            self.process = None
            if self.wanted:
                self.failures += 1
                self.restarts += 1
                delay = restart_delay(self.failures)
                self.state = "restarting"
                self.last_failure = f"{_describe_exit(code)} at {time.strftime('%H:%M:%S')}: {self._log_tail()}"
                self.reason = (
                    f"the block server exited ({_describe_exit(code)}): {self._log_tail()}; restarting in {delay:.0f} s"
                )
                self.next_start_at = now + delay
                logger.warning(self.reason)
        if self.wanted and self.process is None and self.next_start_at is not None and now >= self.next_start_at:
            self._spawn()
        stats = read_stats(self.stats_path) if self.process is not None else None
        if self.process is not None and stats is not None:
            self.state = {"online": "online", "loading": "loading", "joining": "starting"}.get(
                stats.get("state"), self.state
            )
            if self.state == "online":
                self.reason = stats.get("state_reason", "")
                if now - self.started_at > HEALTHY_AFTER_S:
                    self.failures = 0
        return SupervisorStatus(
            self.state, self.reason, self.process.pid if self.process else None, self.restarts, stats, self.last_failure
        )

    # --- process -----------------------------------------------------------------------------------
    def _spawn(self) -> None:
        self.stats_path.unlink(missing_ok=True)
        command = corolla_command("serve", *self.args, "--stats-file", str(self.stats_path), "--exit-with-parent")
        log = open(self.log_path, "ab")  # noqa: SIM115  (the child owns it)
        self.process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        self.pid_path.write_text(str(self.process.pid))
        self.state, self.reason = "starting", "starting the block server"
        self.next_start_at = None
        self.started_at = time.monotonic()

    def _terminate(self, timeout: float = 20.0) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)  # the server announces OFFLINE before leaving
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # its hivemind children, if any are left

    def _log_tail(self, lines: int = 3) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except FileNotFoundError:
            return "no log"
        useful = [line for line in text if line.strip()][-lines:]
        return " | ".join(line.strip()[:300] for line in useful) or "no output"

    def close(self) -> None:
        self.stop("the node is shutting down")


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
