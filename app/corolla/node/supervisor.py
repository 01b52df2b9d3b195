"""Supervising the block server: a child process (a fresh interpreter: spawn, never fork), its states and
their reasons, and restarts with backoff after a crash. `poll()` is called about once a second.

The node calls it from several threads at once (its ticker, API requests, the policy): one lock makes each
action whole. A stop or start holds it for as long as the old server takes to leave (up to 30 s); a poll
meanwhile answers what is known without waiting, so the window's status never hangs on a stop."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from corolla.chat_engine.channel import SECRET_ENV, SOCKET_ENV, new_secret
from corolla.executable import corolla_command
from corolla.node.engine_link import EngineAddress
from corolla.swarm.server.stats import PARENT_PID_ENV, ServerStats, read_stats

ENGINE_SOCKETS = hasattr(socket, "AF_UNIX") and sys.platform != "win32"  # the chat engine's channel (Unix socket)

logger = logging.getLogger(__name__)
MAX_BACKOFF_S = 60.0
HEALTHY_AFTER_S = 300.0  # running this long clears the failure count
LOG_MAX_BYTES = 4 * 2**20  # server.log is cut back to empty beyond this (its end kept in server.log.1)
LOG_KEEP_BYTES = 2**20
LOG_TAIL_BYTES = 64 * 2**10  # after a crash only the end of the log is read


RETAKE_RELAY_EXIT_CODE = 75  # as corolla.swarm.server.announcing (not imported: the node stays light)


def restart_delay(failures: int) -> float:
    """1, 2, 4, ... 60 s after the 1st, 2nd, 3rd ... consecutive crash."""
    return min(2.0 ** max(failures - 1, 0), MAX_BACKOFF_S)


def _one_at_a_time(method: Callable) -> Callable:
    """The supervisor's action runs whole, never interleaved with another action or a poll."""

    @functools.wraps(method)
    def locked(self: ServerSupervisor, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


@dataclass
class SupervisorStatus:
    state: str  # stopped | starting | loading | online | paused | restarting | failed
    reason: str
    pid: int | None
    restarts: int
    stats: ServerStats | None  # the server's latest snapshot (None: none yet, or no server)
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
        # The server's chat engine (chat_engine/): its socket, and a secret new for each server run.
        self.chat_socket = workdir / "chat.sock"
        self._chat_secret = new_secret()
        self._tree: list[psutil.Process] = []  # the server and what it started (p2pd, probe daemons)
        self.closed = False  # the node is shutting down: nothing may start a server any more
        self.keeping_model = False  # paused with the blocks loaded (the server runs, OFFLINE)
        # Called before a server that stopped to take a relay again is started: its new arguments (None: the same).
        self.args_for_restart: Callable[[], list[str] | None] | None = None
        # Without it a poll on the ticker's thread could restart a crashed server while a stop on an API
        # thread was taking the process away: that server then ran on, unknown to "stopped".
        self._lock = threading.RLock()
        self._last_stats: ServerStats | None = None
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
    @_one_at_a_time
    def start(self, args: list[str]) -> None:
        """Run `corolla serve ARGS` (replacing a running server if the arguments changed)."""
        if self.process is not None and self.process.poll() is None and args == self.args:
            if self.keeping_model:
                self.resume()
            self.wanted = True
            return
        self._terminate()
        self.args, self.wanted, self.failures = list(args), True, 0
        self._spawn()

    @_one_at_a_time
    def stop(self, reason: str = "stopped by the user") -> None:
        self.wanted = False
        self._terminate()
        self.state, self.reason, self.next_start_at = "stopped", reason, None

    @_one_at_a_time
    def pause(self, reason: str, keep_model: bool = False) -> None:
        """Stop serving. `keep_model`: the server stays running with its blocks loaded, OFFLINE for the
        swarm (resumed in about a second); otherwise it exits and its memory is freed."""
        if keep_model and self.running and hasattr(signal, "SIGUSR1"):
            self.process.send_signal(signal.SIGUSR1)
            self.wanted = False  # a crash meanwhile is not restarted: the user paused
            self.keeping_model = True
            self.state, self.reason = "paused", reason
            return
        self.wanted = False
        self.keeping_model = False
        self._terminate()
        self.state, self.reason, self.next_start_at = "paused", reason, None

    @_one_at_a_time
    def resume(self) -> None:
        if self.keeping_model and self.running:
            self.process.send_signal(signal.SIGUSR2)
            self.wanted, self.keeping_model = True, False
            self.state, self.reason = "starting", "resuming"
            return
        self.keeping_model = False
        if self.args is not None and (self.process is None or self.process.poll() is not None):
            self.wanted = True
            self._spawn()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def chat_engine(self) -> EngineAddress | None:
        """Where the server writes the node's chats: while it serves (online, not paused), else None."""
        if not ENGINE_SOCKETS or not self.running or self.keeping_model or self.state != "online":
            return None
        return EngineAddress(str(self.chat_socket), self._chat_secret)

    # --- status ------------------------------------------------------------------------------------
    def poll(self) -> SupervisorStatus:
        if not self._lock.acquire(blocking=False):  # an action is under way (e.g. a stop waiting for the server)
            return self._known_status()
        try:
            return self._poll()
        finally:
            self._lock.release()

    def _known_status(self) -> SupervisorStatus:
        process = self.process  # read once: the action under way may take it away
        pid = process.pid if process else None
        return SupervisorStatus(self.state, self.reason, pid, self.restarts, self._last_stats, self.last_failure)

    def _poll(self) -> SupervisorStatus:
        now = time.monotonic()
        if self.process is not None and self.process.poll() is None:
            self._track_tree(self.process.pid)
        self._cap_log()
        if self.process is not None and self.process.poll() is not None:
            code = self.process.returncode
            self.keeping_model = False  # a restarted server serves: the pause went with the process
            self._kill_leftovers(self.process.pid)  # an abrupt death may leave p2pd
            self.process = None
            if self.wanted and code == RETAKE_RELAY_EXIT_CODE:  # no crash: it stopped to reserve its relay again
                self.state, self.reason = "restarting", "taking a relay again (the swarm's relay restarted or left)"
                if self.args_for_restart is not None:
                    self.args = self.args_for_restart() or self.args
                self.next_start_at = now
                logger.info(self.reason)
            elif self.wanted:
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
        stats = self._last_stats = read_stats(self.stats_path) if self.process is not None else None
        if self.process is not None and stats is not None:
            states = {"online": "online", "loading": "loading", "joining": "starting"}
            if self.keeping_model:
                states = {"loading": "paused", "online": "paused", "paused": "paused"}  # until it has paused
            self.state = states.get(stats.state, self.state)
            if self.state == "online":
                self.reason = stats.state_reason
                if now - self.started_at > HEALTHY_AFTER_S:
                    self.failures = 0
        return SupervisorStatus(
            self.state, self.reason, self.process.pid if self.process else None, self.restarts, stats, self.last_failure
        )

    # --- process -----------------------------------------------------------------------------------
    def _spawn(self) -> None:
        if self.closed:  # a start that raced with the node's shutdown (e.g. a model prepared just now)
            self.wanted = False
            return
        self.stats_path.unlink(missing_ok=True)
        self._rotate_log()
        command = corolla_command("serve", *self.args, "--stats-file", str(self.stats_path), "--exit-with-parent")
        self._chat_secret = new_secret()
        # Where asyncio has no Unix sockets (Windows), the node chats with its own client, as before.
        chat = {SOCKET_ENV: str(self.chat_socket), SECRET_ENV: self._chat_secret} if ENGINE_SOCKETS else {}
        log = open(self.log_path, "ab")  # noqa: SIM115  (the child owns it; appends, so the log can be cut)
        self.process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            # The server watches this pid: a node that dies before the server's watch begins is still noticed.
            env={**os.environ, "PYTHONUNBUFFERED": "1", PARENT_PID_ENV: str(os.getpid()), **chat},
        )
        log.close()
        self._tree = []
        self.pid_path.write_text(str(self.process.pid))
        self.state, self.reason = "starting", "starting the block server"
        self.next_start_at = None
        self.started_at = time.monotonic()

    def _terminate(self, timeout: float = 20.0) -> None:
        process, self.process = self.process, None
        self.keeping_model = False
        if process is None:
            return
        if process.poll() is None:
            self._track_tree(process.pid)
            process.send_signal(signal.SIGTERM)  # the server announces OFFLINE before leaving
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        self._kill_leftovers(process.pid)

    def _track_tree(self, pid: int) -> None:
        """Remember the server's descendants while it lives: once it is dead they can no longer be found
        from it (orphans are re-parented), and each must go with it."""
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pid)
            known = {p.pid for p in self._tree}
            self._tree += [p for p in root.children(recursive=True) if p.pid not in known]

    def _kill_leftovers(self, pid: int) -> None:
        """SIGKILL the dead server's process group and every process it had started (psutil checks the
        creation time, so a reused pid is never hit)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        for child in self._tree:
            with contextlib.suppress(psutil.Error):
                if child.is_running():
                    child.kill()
        for child in self._tree:
            with contextlib.suppress(psutil.Error):
                child.wait(5)
        self._tree = []

    # --- the log: bounded, and only its end is read ----------------------------------------------------
    @property
    def _old_log_path(self) -> Path:
        return self.log_path.with_name(self.log_path.name + ".1")

    def _rotate_log(self) -> None:
        """Each server start begins a fresh log; the previous run's end stays in server.log.1."""
        with contextlib.suppress(OSError):
            if self.log_path.stat().st_size > 0:
                self._keep_end_of_log()
                self.log_path.unlink()

    def _cap_log(self) -> None:
        """A running server's log that grew past the cap is cut back to empty (the child appends, so it
        just goes on writing at the new end)."""
        with contextlib.suppress(OSError):
            if self.log_path.stat().st_size > LOG_MAX_BYTES:
                self._keep_end_of_log()
                os.truncate(self.log_path, 0)

    def _keep_end_of_log(self) -> None:
        self._old_log_path.write_bytes(_read_end(self.log_path, LOG_KEEP_BYTES))

    def _log_tail(self, lines: int = 3) -> str:
        try:
            text = _read_end(self.log_path, LOG_TAIL_BYTES).decode(errors="replace").strip().splitlines()
        except FileNotFoundError:
            return "no log"
        useful = [line for line in text if line.strip()][-lines:]
        return " | ".join(line.strip()[:300] for line in useful) or "no output"

    @_one_at_a_time
    def kill_now(self) -> None:
        """No goodbye: SIGKILL the server and everything it started (the node is being forced down)."""
        process, self.process = self.process, None
        if process is not None:
            if process.poll() is None:
                self._track_tree(process.pid)
            self._kill_leftovers(process.pid)

    @_one_at_a_time
    def close(self) -> None:
        self.closed = True
        self.stop("the node is shutting down")


def _read_end(path: Path, size: int) -> bytes:
    with open(path, "rb") as file:
        file.seek(0, os.SEEK_END)
        file.seek(max(file.tell() - size, 0))
        return file.read(size)


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
