"""The settings dialog's "Swarms on this network", driven in a lab host against that host's real node:
wait for the list to show a neighbour's swarm, choose it, press Join; prints what happened as JSON.

    lan_gui_join.py URL TOKEN
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
    app = QApplication([])
    dialog = SettingsDialog(NodeClient(sys.argv[1], sys.argv[2]))
    dialog.show()
    report = {"settings_loaded": wait(app, lambda: dialog.settings is not None, 20)}
    report["discovery_checkbox"] = dialog.lan_discovery.isChecked()
    dialog.invite_option.setChecked(True)
    report["list_visible"] = dialog.lan_list.isVisible()
    report["listed"] = wait(app, lambda: dialog.lan_list.count() > 0, 30)
    report["items"] = [dialog.lan_list.item(i).text() for i in range(dialog.lan_list.count())]
    report["join_enabled_before_choice"] = dialog.lan_join.isEnabled()
    if report["listed"]:
        dialog.lan_list.item(0).setSelected(True)
        dialog.lan_join.click()
        report["accepted"] = wait(app, lambda: dialog.result() == SettingsDialog.DialogCode.Accepted, 30)
    report["error"] = dialog.error.text()
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
