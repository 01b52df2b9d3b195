"""Find the user's node, or start one in the background (it keeps running when the window closes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from corolla.executable import corolla_command
from corolla.node.paths import NodePaths


def running_node(paths: NodePaths | None = None) -> tuple[str, str] | None:
    """(url, token) of a node that answers, or None. Reads the lock file; never imports the node."""
    paths = paths or NodePaths.default()
    try:
        data = json.loads(paths.lock_file.read_text())
        with urllib.request.urlopen(f"{data['url']}/api/ping", timeout=1) as response:
            if response.status == 200:
                return data["url"], Path(data["token_file"]).read_text().strip()
    except (OSError, ValueError, KeyError):
        return None
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


def start_node(platform: str = sys.platform, await_consent: bool = False) -> subprocess.Popen:
    """`corolla node` in its own session (or detached on Windows), so it outlives the window. With
    `await_consent` (the first run) the node contributes nothing until the user agrees in the window."""
    env = None
    if await_consent:  # WSLENV carries the variable into the WSL distro on Windows
        wslenv = ":".join(filter(None, (os.environ.get("WSLENV"), "COROLLA_AWAIT_CONSENT")))
        env = {**os.environ, "COROLLA_AWAIT_CONSENT": "1", "WSLENV": wslenv}
    if platform == "win32":
        flags = getattr(subprocess, "CREATE_NO_WINDOW", 0) | getattr(subprocess, "DETACHED_PROCESS", 0)
        options: dict = {"creationflags": flags}
    else:
        options = {"start_new_session": True}
    return subprocess.Popen(
        node_command(platform),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env=env,
        **options,
    )
