"""The first-run dialog joining a private swarm in one paste, driven in a lab host against that host's
real node: a damaged invite first (the dialog must say why and stay open), then the real one, then
"Agree and start contributing". Prints what happened as JSON.

    invite_gui_join.py URL TOKEN INVITE
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtWidgets import QApplication

from corolla.gui.node_client import NodeClient
from corolla.gui.settings_dialog import SettingsDialog


def wait(app: QApplication, condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        app.processEvents()
        if condition():
            return True
        time.sleep(0.05)
    return False


def main() -> None:
    url, token, invite = sys.argv[1:4]
    app = QApplication([])
    dialog = SettingsDialog(NodeClient(url, token), first_run=True)
    dialog.show()
    report = {"settings_loaded": wait(app, lambda: dialog.settings is not None, 20)}
    dialog.invite_option.setChecked(True)
    dialog.invite.setText(invite[: len(invite) // 2])  # half of it: a paste that went wrong
    dialog.save()
    report["damaged_error"] = dialog.error.text() if wait(app, lambda: bool(dialog.error.text()), 30) else ""
    report["open_after_damaged"] = dialog.isVisible() and dialog.result() != SettingsDialog.DialogCode.Accepted
    dialog.invite.setText(invite)
    report["save_text"] = dialog.save_button.text()
    report["pasted_at"] = time.time()
    dialog.save()
    report["accepted"] = wait(app, lambda: dialog.result() == SettingsDialog.DialogCode.Accepted, 60)
    report["error"] = dialog.error.text()
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
