"""`corolla uninstall`: what removing the app leaves behind, cleared on request, the same on every OS.

Package managers remove the program files (the .deb's prerm, the Windows uninstaller, dragging the
macOS app to the Trash); what lives in the user's account is cleared here: the running node, the
login entry, and with `--user-data` the settings, chat history, stats, caches and keyring secrets.
"""

from __future__ import annotations

import os
import shutil
import signal
import time

from corolla.gui import autostart  # pure file/registry writes; no Qt
from corolla.node.instance import find_running_node
from corolla.node.paths import NodePaths
from corolla.node.secrets import SecretStore

SECRET_NAMES = ("hf_token",)


def stop_running_node(paths: NodePaths, timeout: float = 15.0) -> bool:
    """Stop the node (and through it, its block server); True if one was running."""
    address = find_running_node(paths)
    if address is None:
        return False
    os.kill(address.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(address.pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    os.kill(address.pid, signal.SIGKILL)
    return True


def uninstall(paths: NodePaths, remove_user_data: bool) -> list[str]:
    """Clear Corolla from this user account; returns what was done, one line each."""
    done = []
    if stop_running_node(paths):
        done.append("stopped the running node")
    if autostart.is_enabled():
        autostart.set_enabled(False)
        done.append("removed the start-at-login entry")
    if remove_user_data:
        secrets = SecretStore()
        for name in SECRET_NAMES:
            if secrets.get(name):
                secrets.set(name, None)
                done.append(f"deleted the {name} secret from the keyring")
        for folder in dict.fromkeys((paths.config_dir, paths.data_dir, paths.cache_dir)):
            if folder.exists():
                shutil.rmtree(folder)
                done.append(f"deleted {folder}")
    return done
