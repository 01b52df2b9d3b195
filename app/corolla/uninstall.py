"""`corolla uninstall`: what removing the app leaves behind, cleared on request, the same on every OS.

Package managers remove the program files (the .deb's prerm, the Windows uninstaller, dragging the
macOS app to the Trash); what lives in the user's account is cleared here: the running node, the
login entry, and with `--user-data` the settings, chat history, stats, caches and keyring secrets.
"""

from __future__ import annotations

import shutil

from corolla.gui import autostart  # pure file/registry writes; no Qt
from corolla.node.instance import node_process, read_address
from corolla.node.paths import NodePaths
from corolla.node.secrets import SecretStore

SECRET_NAMES = ("hf_token",)


def stop_running_node(paths: NodePaths, timeout: float = 15.0) -> bool:
    """Stop the node (and through it, its block server); True if one was running. Found by its lock
    file and process, so a node that is still starting up is stopped too."""
    address = read_address(paths)
    process = node_process(address) if address is not None else None
    if process is None:
        return False
    import psutil  # only here: the Windows window bundle never finds a local node (it runs in WSL)

    process.terminate()
    try:
        process.wait(timeout)
    except psutil.TimeoutExpired:
        process.kill()
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
