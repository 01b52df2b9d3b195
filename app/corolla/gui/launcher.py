"""Find the user's node, or start one in the background (it keeps running when the window closes)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from corolla.executable import corolla_command
from corolla.node.instance import find_running_node, read_address
from corolla.node.paths import NodePaths


def running_node(paths: NodePaths | None = None) -> tuple[str, str] | None:
    """(url, token) of a node that answers, or None: node/instance.py's lookup (its lock file and a ping;
    nothing of the node's service is imported)."""
    address = find_running_node(paths or NodePaths.default(), timeout=1)
    if address is None:
        return None
    try:
        return address.url, address.token()
    except OSError:
        return None


def running_pid(paths: NodePaths | None = None) -> int | None:
    """The pid in the node's lock file (the window's own machine only: not a WSL node's)."""
    address = read_address(paths or NodePaths.default())
    try:
        return int(address.pid) if address is not None else None
    except (TypeError, ValueError):  # a lock file another program wrote
        return None


WSL_DISTRO = "Corolla"


def node_command(platform: str = sys.platform, distro: str = WSL_DISTRO) -> list[str]:
    """How to start the node. On Windows hivemind has no native build: the node runs inside the Corolla
    WSL2 distro and the window talks to it over localhost, exactly as elsewhere."""
    if platform == "win32":
        return ["wsl.exe", "--distribution", distro, "--exec", "corolla", "node"]
    return corolla_command("node")


def lock_file_command(distro: str = WSL_DISTRO) -> list[str]:
    """On Windows: print the node's lock file from inside the distro (it lives in the Linux home)."""
    return [
        "wsl.exe",
        "--distribution",
        distro,
        "--exec",
        "sh",
        "-c",
        'cat "${COROLLA_HOME:-$HOME/.config/corolla}/node.json" 2>/dev/null || cat "$HOME/.config/corolla/node.json"',
    ]


LOG_KEEP_BYTES = 5 * 1024 * 1024


def node_log(paths: NodePaths | None = None) -> Path:
    """Where a node the window starts writes (the same file `corolla demo` uses): appended to, and moved
    to node.log.1 once it passes 5 MB, so a long-lived install keeps two bounded logs."""
    paths = (paths or NodePaths.default()).ensure()
    log = paths.data_dir / "node.log"
    try:
        if log.stat().st_size > LOG_KEEP_BYTES:
            log.replace(log.with_name("node.log.1"))
    except OSError:
        pass
    return log


def start_node(platform: str = sys.platform, await_consent: bool = False, paths: NodePaths | None = None):
    """`corolla node` in its own session (or detached on Windows), so it outlives the window; its output
    goes to node_log(). With `await_consent` (the first run) the node contributes nothing until the user
    agrees in the window."""
    env = None
    if await_consent:  # WSLENV carries the variable into the WSL distro on Windows
        wslenv = ":".join(filter(None, (os.environ.get("WSLENV"), "COROLLA_AWAIT_CONSENT")))
        env = {**os.environ, "COROLLA_AWAIT_CONSENT": "1", "WSLENV": wslenv}
    if platform == "win32":
        flags = getattr(subprocess, "CREATE_NO_WINDOW", 0) | getattr(subprocess, "DETACHED_PROCESS", 0)
        options: dict = {"creationflags": flags}
    else:
        options = {"start_new_session": True}
    with open(node_log(paths), "ab") as log:
        log.write(f"--- started by the window at {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        log.flush()
        return subprocess.Popen(
            node_command(platform),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            **options,
        )
