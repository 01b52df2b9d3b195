"""One node per user: a lock file (created exclusively) holding its address and pid, and a random API
token in a 0600 file. A lock whose node neither answers a ping nor runs is stale and is replaced."""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from corolla.api.client import ping
from corolla.node.paths import NodePaths

# Set in the node's environment to its pid: every process it starts (p2pd, the block server) carries it,
# so what a killed node left behind is found (reap_orphans_of).
NODE_PID_ENV = "COROLLA_NODE_PID"


@dataclass(frozen=True)
class NodeAddress:
    url: str
    pid: int
    started_at: float
    token_file: str

    def token(self) -> str:
        return Path(self.token_file).read_text().strip()


class AlreadyRunning(RuntimeError):
    def __init__(self, address: NodeAddress):
        self.address = address
        super().__init__(f"a Corolla node is already running at {address.url} (pid {address.pid})")


def read_address(paths: NodePaths) -> NodeAddress | None:
    try:
        return NodeAddress(**json.loads(paths.lock_file.read_text()))
    except (OSError, ValueError, TypeError):  # none, unreadable, or another version's
        return None


def is_alive(address: NodeAddress, timeout: float = 2.0) -> bool:
    return ping(address.url, timeout)


def find_running_node(paths: NodePaths, timeout: float = 2.0) -> NodeAddress | None:
    """The node of this lock file if it answers a ping (the CLI, the window and `corolla demo` all ask here)."""
    address = read_address(paths)
    return address if address is not None and is_alive(address, timeout) else None


def new_token(paths: NodePaths) -> str:
    """A fresh random token in a file only this user can read."""
    token = secrets.token_urlsafe(32)
    fd = os.open(paths.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    os.chmod(paths.token_file, 0o600)
    return token


def claim(paths: NodePaths, url: str) -> NodeAddress:
    """Write the lock file exclusively; a live node there raises AlreadyRunning, a stale one is replaced."""
    address = NodeAddress(url=url, pid=os.getpid(), started_at=time.time(), token_file=str(paths.token_file))
    for _ in range(2):
        try:
            fd = os.open(paths.lock_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            existing = read_address(paths)
            # A node too busy to answer a ping (loading a model) is still alive: its process decides.
            if (
                existing is not None
                and existing.pid != os.getpid()
                and (node_process(existing) is not None or is_alive(existing))
            ):
                raise AlreadyRunning(existing) from None
            if existing is not None:
                reap_orphans_of(existing)
            paths.lock_file.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(address), f)
        return address
    raise RuntimeError(f"could not create {paths.lock_file}")


def is_node_command(cmdline: list[str]) -> bool:
    """`corolla node` as a source install (`python -m corolla.cli node`) or the bundle runs it."""
    if "node" not in cmdline:
        return False
    return "corolla.cli" in " ".join(cmdline) or Path(cmdline[0]).name.lower() in ("corolla", "corolla.exe")


def node_process(address: NodeAddress):
    """The live process behind a lock file (a psutil.Process), or None: checked by pid and command
    line, so it works while the node is still starting and never picks a reused pid."""
    import psutil

    try:
        process = psutil.Process(address.pid)
        if is_node_command(process.cmdline()) and process.create_time() <= address.started_at + 1:
            return process
    except psutil.Error:
        pass
    return None


def reap_orphans_of(dead: NodeAddress) -> int:
    """Processes a killed node had forked (hivemind's DHT process and its p2pd) outlive it; stop them.

    They are recognised as orphans (adopted by init) running `corolla node`, started after the dead
    node started and not the dead node itself."""
    import psutil

    if psutil.pid_exists(dead.pid):
        return 0
    reaped = 0
    for process in psutil.process_iter(["cmdline", "create_time", "ppid"]):
        try:
            cmdline = process.info["cmdline"] or []
            if (
                process.pid != os.getpid()
                and process.info["ppid"] == 1
                and (is_node_command(cmdline) or _started_by(process, dead.pid))
                and process.info["create_time"] >= dead.started_at - 1
            ):
                for child in process.children(recursive=True):
                    child.kill()
                process.kill()
                reaped += 1
        except psutil.Error:
            pass
    return reaped


def _started_by(process, node_pid: int) -> bool:
    """A process whose environment names `node_pid` as its node (p2pd: the node's DHT runs in-process, so
    its p2pd is the node's own child and outlives a killed node)."""
    try:
        return process.environ().get(NODE_PID_ENV) == str(node_pid)
    except Exception:  # another user's process, or gone
        return False


def release(paths: NodePaths) -> None:
    address = read_address(paths)
    if address is not None and address.pid == os.getpid():
        paths.lock_file.unlink(missing_ok=True)
