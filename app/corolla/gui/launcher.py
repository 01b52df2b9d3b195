"""Find the user's node, or start one in the background (it keeps running when the window closes)."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

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


def start_node() -> subprocess.Popen:
    """`corolla node` in its own session, so it outlives the window."""
    return subprocess.Popen(
        [sys.executable, "-m", "corolla.cli", "node"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
