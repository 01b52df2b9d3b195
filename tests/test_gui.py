"""The window against a real node serving the demo model (pytest-qt, offscreen)."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

pytest.importorskip("PySide6")
pytestmark = pytest.mark.slow

from corolla.gui.node_client import NodeClient  # noqa: E402
from corolla.gui.window import MainWindow, tray_state  # noqa: E402
from tests.support.node import NodeProcess  # noqa: E402


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    process = NodeProcess(tmp_path_factory.mktemp("gui-node"))
    process.wait_contribution("online")
    yield process
    process.stop()


@pytest.fixture
def window(qtbot, node):
    win = MainWindow(NodeClient(node.url, node.token))
    qtbot.addWidget(win)
    win.show()
    return win


def test_contribute_chat_map_and_stats(qtbot, window, node):
    qtbot.waitUntil(lambda: window.contribute.state.text() == "Contributing", timeout=60_000)
    assert window.contribute.fields["blocks"].text() == "0:6"
    assert "random weights" in window.contribute.fields["model"].text()
    qtbot.waitUntil(lambda: "recommended" in window.contribute.hardware.text(), timeout=30_000)

    window.tabs.setCurrentWidget(window.chat)
    window.chat.input.setPlainText("hello from the window")
    finished = []
    window.chat.reply_finished.connect(finished.append)
    window.chat.send()
    qtbot.waitUntil(lambda: len(window.chat.messages) >= 2 and window.chat.stream is None, timeout=90_000)
    assert finished, f"no reply: {window.chat.info.text()}"
    assert finished[0]["status"] == "complete" and finished[0]["tokens"] > 0
    assert "hello from the window" in window.chat.transcript.toPlainText()
    assert window.chat.messages[-1]["role"] == "assistant" and window.chat.messages[-1]["status"] == "complete"
    assert "tokens/s" in window.chat.info.text()
    stored = node.get(f"/api/chats/{window.chat.chat_id}").json()["messages"]
    assert stored[-1]["content"] == window.chat.messages[-1]["content"]

    # Regenerate: the last answer is replaced, not appended to.
    finished.clear()
    window.chat.temperature.setValue(0.9)
    window.chat.regenerate()
    qtbot.waitUntil(lambda: bool(finished) and window.chat.stream is None, timeout=90_000)
    assert finished[0]["status"] == "complete"
    stored = node.get(f"/api/chats/{window.chat.chat_id}").json()["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert stored[-1]["content"] == window.chat.messages[-1]["content"]

    window.tabs.setCurrentWidget(window.swarm)
    qtbot.waitUntil(lambda: window.swarm.map.model is not None, timeout=30_000)
    servers = window.swarm.map.model["servers"]
    assert any(s["this_computer"] and (s["start_block"], s["end_block"]) == (0, 6) for s in servers)
    assert "healthy" in window.swarm.summary.text()
    assert window.swarm.peers.rowCount() >= 1 and window.swarm.peers.item(0, 0).text() == "★ this computer"
    window.swarm.map.grab()  # paints without error

    window.tabs.setCurrentWidget(window.stats)
    window.refresh_stats()
    qtbot.waitUntil(lambda: sum(r["tokens_served"] for r in window.stats.history) > 0, timeout=30_000)
    assert "tokens served" in window.stats.total.text()
    window.stats.grab()


def test_pause_and_resume_from_the_window(qtbot, window, node):
    qtbot.waitUntil(lambda: window.contribute.state.text() == "Contributing", timeout=60_000)
    window.contribute.pause_button.click()
    qtbot.waitUntil(lambda: window.contribute.state.text() == "Paused", timeout=60_000)
    assert window.contribute.resume_button.isEnabled()
    window.contribute.resume_button.click()
    qtbot.waitUntil(lambda: window.contribute.state.text() == "Contributing", timeout=120_000)


def test_closing_the_window_leaves_the_node_running(qtbot, window, node):
    window.close()
    assert httpx.get(f"{node.url}/api/ping").status_code == 200


def test_a_dead_node_is_explained(qtbot):
    win = MainWindow(NodeClient("http://127.0.0.1:9", "x"))
    qtbot.addWidget(win)
    qtbot.waitUntil(lambda: "does not answer" in win.banner.text(), timeout=10_000)


def test_tray_states():
    assert tray_state("online") == "contributing" and tray_state("paused") == "paused"
    assert tray_state("restarting") == "error" and tray_state("stopped") == "idle"


def test_tray_menu(qtbot, window):
    from PySide6.QtWidgets import QSystemTrayIcon

    if not QSystemTrayIcon.isSystemTrayAvailable():
        pytest.skip("this platform has no system tray")
    assert window.install_tray()


def test_the_window_never_imports_torch_or_hivemind():
    code = (
        "import sys; import corolla.gui.app, corolla.gui.window, corolla.gui.panes; "
        "bad = [m for m in ('torch', 'hivemind', 'transformers') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_settings_dialog_validates_and_saves(qtbot, window, node):
    from corolla.gui.settings_dialog import SettingsDialog

    dialog = SettingsDialog(window.client, first_run=True)
    qtbot.addWidget(dialog)
    qtbot.waitUntil(lambda: dialog.settings is not None, timeout=10_000)
    assert dialog.private.isChecked()
    dialog.check_model()
    qtbot.waitUntil(lambda: "block(s)" in dialog.model_info.text(), timeout=30_000)
    dialog.window.setText("25:00-26:00")
    dialog.autostart.setChecked(False)
    dialog.save()
    qtbot.waitUntil(lambda: "time_window" in dialog.error.text(), timeout=10_000)
    assert node.get("/api/settings").json()["time_window"] is None
    dialog.window.setText("00:00-23:59")
    dialog.memory_cap.setValue(8)
    with qtbot.waitSignal(dialog.accepted, timeout=30_000):
        dialog.save()
    saved = node.get("/api/settings").json()
    assert saved["time_window"] == "00:00-23:59" and saved["memory_cap_gib"] == 8


def test_start_at_login_writes_and_removes_the_autostart_entry(tmp_path, monkeypatch):
    from corolla.gui import autostart

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    if sys.platform != "linux":
        pytest.skip("the Linux entry is what this machine can check")
    autostart.set_enabled(True)
    entry = tmp_path / "autostart" / "corolla.desktop"
    assert autostart.is_enabled() and "corolla.cli app" in entry.read_text()
    autostart.set_enabled(False)
    assert not entry.exists() and not autostart.is_enabled()


def test_node_launcher_command_lines():
    from corolla.gui.launcher import lock_file_command, node_command

    assert node_command("linux")[1:] == ["-m", "corolla.cli", "node"]
    assert node_command("darwin") == node_command("linux")
    assert node_command("win32") == ["wsl.exe", "--distribution", "Corolla", "--exec", "corolla", "node"]
    assert node_command("win32", distro="Other")[2] == "Other"
    command = lock_file_command()
    assert command[:5] == ["wsl.exe", "--distribution", "Corolla", "--exec", "sh"] and "node.json" in command[-1]
