"""Start at login, per OS: an XDG autostart entry (Linux), a LaunchAgent (macOS), a Run key (Windows).
Pure file and registry writes; the window calls them from its settings dialog."""

from __future__ import annotations

import contextlib
import os
import plistlib
import shlex
import sys
from pathlib import Path

from corolla.executable import corolla_command

LABEL = "org.corolla.app"


def _command() -> list[str]:
    return corolla_command("app")


def linux_entry_path() -> Path:
    base = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config"))
    return base / "autostart" / "corolla.desktop"


def mac_agent_path() -> Path:
    return Path.home() / "Library" / "LaunchAgents" / f"{LABEL}.plist"


def is_enabled() -> bool:
    if sys.platform == "darwin":
        return mac_agent_path().exists()
    if sys.platform == "win32":
        import winreg

        try:
            with winreg.OpenKey(winreg.HKEY_CURRENT_USER, r"Software\Microsoft\Windows\CurrentVersion\Run") as key:
                winreg.QueryValueEx(key, "Corolla")
                return True
        except OSError:
            return False
    return linux_entry_path().exists()


def set_enabled(enabled: bool) -> None:
    command = _command()
    if sys.platform == "darwin":
        path = mac_agent_path()
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(plistlib.dumps({"Label": LABEL, "ProgramArguments": command, "RunAtLoad": True}))
        else:
            path.unlink(missing_ok=True)
        return
    if sys.platform == "win32":
        import subprocess
        import winreg

        with winreg.OpenKey(
            winreg.HKEY_CURRENT_USER, r"Software\Microsoft\Windows\CurrentVersion\Run", 0, winreg.KEY_SET_VALUE
        ) as key:
            if enabled:
                winreg.SetValueEx(key, "Corolla", 0, winreg.REG_SZ, subprocess.list2cmdline(command))
            else:
                with contextlib.suppress(OSError):
                    winreg.DeleteValue(key, "Corolla")
        return
    path = linux_entry_path()
    if enabled:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            "[Desktop Entry]\nType=Application\nName=Corolla\nComment=Contribute to and chat with a "
            f"Petals swarm\nExec={shlex.join(command)}\nIcon=corolla\nX-GNOME-Autostart-enabled=true\n"
        )
    else:
        path.unlink(missing_ok=True)
