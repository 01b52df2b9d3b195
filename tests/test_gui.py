"""The window against a real node serving the demo model (pytest-qt, offscreen)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

pytest.importorskip("PySide6")
pytestmark = pytest.mark.slow

from PySide6.QtCore import Qt  # noqa: E402
from PySide6.QtWidgets import QPlainTextEdit  # noqa: E402

from corolla.api.models import Chat, NodeStatus, SwarmModel  # noqa: E402
from corolla.gui.node_client import NodeClient  # noqa: E402
from corolla.gui.prefs import open_prefs  # noqa: E402
from corolla.gui.turns import Turn  # noqa: E402
from corolla.gui.window import MainWindow, tray_state  # noqa: E402
from corolla.testing.node import NodeProcess  # noqa: E402
from corolla.testing.statuses import node_status  # noqa: E402


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    process = NodeProcess(tmp_path_factory.mktemp("gui-node"))
    process.wait_contribution("online")
    yield process
    process.stop()


@pytest.fixture
def prefs(tmp_path):
    return open_prefs(str(tmp_path / "window.ini"))


@pytest.fixture
def window(qtbot, node, prefs):
    win = MainWindow(NodeClient(node.url, node.token), prefs=prefs)
    qtbot.addWidget(win)
    win.show()
    return win


def _chat_until_done(qtbot, window, text: str, key_enter: bool = True) -> list[dict]:
    finished: list = []  # ReplyDone events
    window.chat.reply_finished.connect(finished.append)
    window.chat.input.setPlainText(text)
    if key_enter:
        qtbot.keyClick(window.chat.input, Qt.Key.Key_Return)
    else:
        window.chat.send()
    qtbot.waitUntil(lambda: bool(finished) and window.chat.stream is None, timeout=120_000)
    return finished


def test_contribute_chat_map_and_stats(qtbot, window, node):
    qtbot.waitUntil(lambda: window.contribute.state.text() == "Contributing", timeout=60_000)
    assert window.contribute.fields["blocks"].text() == "0–5 (6 blocks)"
    assert "random weights" in window.contribute.fields["model"].text()
    qtbot.waitUntil(lambda: "recommended" in window.contribute.hardware.text(), timeout=30_000)
    assert "of 6 blocks" in window.contribute.estimate.text()
    window.contribute.blocks.setValue(3)
    assert window.contribute.estimate.text().startswith("3 of 6 blocks")
    window.contribute.show_log()  # the block server's log, one click from the last failure
    log_view = window.contribute.log_dialog.findChild(QPlainTextEdit)
    qtbot.waitUntil(lambda: "Reading" not in log_view.toPlainText(), timeout=10_000)
    assert log_view.toPlainText().strip()
    window.contribute.log_dialog.close()
    # Who can join the private swarm: "This computer only" (the default) says so, and offers no invite
    # (joining with "Let others join", the invite and its Copy button: test_invite_lab, test_gui_lan).
    qtbot.waitUntil(lambda: window.contribute.invite_box.isVisibleTo(window), timeout=30_000)
    assert window.contribute.only_here.isChecked() and window.contribute.let_join.isVisibleTo(window)
    assert "nobody else can join" in window.contribute.share_sentence.text()
    assert not window.contribute.invite.isVisibleTo(window) and node.status()["invite"] is None

    window.tabs.setCurrentWidget(window.chat)
    finished = _chat_until_done(qtbot, window, "hello from the window\nsecond line")
    assert finished[0].status == "complete" and finished[0].tokens > 0, window.chat.info.text()
    assert "hello from the window" in window.chat.transcript.toPlainText()
    assert window.chat.messages[-1].role == "assistant" and window.chat.messages[-1].status == "complete"
    assert "tokens/s" in window.chat.info.text()
    stored = node.get(f"/api/chats/{window.chat.chat_id}").json()
    assert stored["messages"][0]["content"] == "hello from the window\nsecond line"
    assert stored["messages"][-1]["content"] == window.chat.messages[-1].content
    qtbot.waitUntil(lambda: node.get(f"/api/chats/{window.chat.chat_id}").json()["title"] == "hello from the window")

    # Regenerate: the last answer is replaced, not appended to.
    finished.clear()
    window.chat.temperature.setValue(0.9)
    window.chat.regenerate()
    qtbot.waitUntil(lambda: bool(finished) and window.chat.stream is None, timeout=90_000)
    assert finished[0].status == "complete"
    stored = node.get(f"/api/chats/{window.chat.chat_id}").json()["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant"]

    # The map: this computer's server, the route through it, the coverage strip.
    window.tabs.setCurrentWidget(window.swarm)
    window.refresh_swarm()
    qtbot.waitUntil(lambda: window.swarm.map.model is not None and bool(window.swarm.map.edges), timeout=60_000)
    own = [box for box in window.swarm.map.boxes_by_peer.values() if box.server.this_computer]
    assert len(own) == 1 and (own[0].server.start_block, own[0].server.end_block) == (0, 6)
    assert window.swarm.map.model.route[0].peer_id == own[0].peer_id
    assert "every block is served" in window.swarm.summary.text()
    assert window.swarm.coverage.counts == [1] * 6
    qtbot.waitUntil(lambda: window.swarm.table.rowCount() >= 1, timeout=5_000)
    assert window.swarm.table.data(window.swarm.table.index(0, 0)) == "★ this computer"
    assert window.swarm.table.data(window.swarm.table.index(0, 3)) == "0–5"  # blocks as the strip counts them
    window.swarm.map.pin(own[0].peer_id)
    assert own[0].peer_id in window.swarm.details.text()
    # A server is never checked against itself: the button stays off for this computer's own server.
    assert not window.swarm.check_button.isEnabled()
    assert window.chat.route_text.startswith("blocks 0–5 from the server …")
    assert window.chat.model_picker.currentText().startswith("corolla-demo-tiny-llama")
    # The node's own model by its name (the card's), not its swarm prefix.
    assert window.chat.model_picker.currentText().startswith("corolla-demo-tiny-llama (random weights) — ")
    assert window.swarm.summary.text().startswith("corolla-demo-tiny-llama (random weights): 6 blocks")
    window.grab()

    # Stats: charts built on first show, with the reply's tokens; lifetime totals.
    window.tabs.setCurrentWidget(window.stats)
    qtbot.waitUntil(lambda: sum(r.tokens_served for r in window.stats.history) > 0, timeout=60_000)
    assert window.stats.charts is not None
    qtbot.waitUntil(lambda: "tokens to" in window.stats.lifetime.text(), timeout=30_000)
    assert "tokens served" in window.stats.total.text()
    window.stats.set_range("7d")
    qtbot.waitUntil(lambda: "Last 7 days" in window.stats.total.text(), timeout=10_000)
    assert len(window.stats.charts["tokens_served"].slots) == 28
    chart = window.stats.charts["tokens_served"]
    hit = next(s for s in chart.slots if s[1] > 0)
    assert chart.value_at(hit[0] + 1) == hit
    window.grab()


def test_enter_sends_shift_enter_breaks_and_empty_send_is_explained(qtbot, window):
    window.tabs.setCurrentWidget(window.chat)
    window.chat.input.setFocus()
    qtbot.keyClicks(window.chat.input, "line one")
    qtbot.keyClick(window.chat.input, Qt.Key.Key_Return, Qt.KeyboardModifier.ShiftModifier)
    qtbot.keyClicks(window.chat.input, "line two")
    assert window.chat.input.toPlainText() == "line one\nline two"
    assert window.chat.stream is None
    window.chat.input.clear()
    qtbot.keyClick(window.chat.input, Qt.Key.Key_Return)
    assert "Type a message first" in window.chat.info.text() and window.chat.stream is None


def test_a_chat_keeps_who_may_read_it_and_shows_who_saw_the_reply(qtbot, window, node):
    chat = window.chat
    window.tabs.setCurrentWidget(chat)
    qtbot.waitUntil(lambda: window.contribute.state.text() == "Contributing", timeout=60_000)
    own = node.status()["contribution"]["peer_id"]
    chat.chat_id, chat.chat, chat.messages = None, None, []
    chat._show_privacy("local")  # picked before the chat exists: the new chat takes it
    assert "never leaves" in chat.privacy_note.text()
    finished = _chat_until_done(qtbot, window, "keep this between us", key_enter=False)
    assert finished[-1].seen_by[0].peer_id == own
    assert node.get(f"/api/chats/{chat.chat_id}").json()["privacy"]["level"] == "local"
    assert chat.seen_by.text().startswith("The last reply's text was seen by: this computer")
    assert "blocks 0–5" in chat.seen_by.text()
    # "Only these peers" with no trusted peers set: the node refuses, and the picker goes back.
    peers = chat.privacy_picker.findData("peers")
    chat.privacy_picker.setCurrentIndex(peers)
    chat._privacy_picked(peers)
    qtbot.waitUntil(lambda: "Could not change who may read" in chat.info.text(), timeout=10_000)
    assert chat.privacy_level() == "local"
    members = chat.privacy_picker.findData("members")
    chat.privacy_picker.setCurrentIndex(members)
    chat._privacy_picked(members)
    qtbot.waitUntil(lambda: chat.info.text().startswith("From the next reply on"), timeout=10_000)
    assert node.get(f"/api/chats/{chat.chat_id}").json()["privacy"]["level"] == "members"
    chat._load(Chat.model_validate(node.get(f"/api/chats/{chat.chat_id}").json()))  # as when the chat is opened again
    assert chat.privacy_level() == "members" and "this computer" in chat.seen_by.text()


def test_ctrl_n_starts_a_chat_and_esc_stops_a_reply(qtbot, window, node):
    window.tabs.setCurrentWidget(window.contribute)
    window.activateWindow()  # window shortcuts go to the active window
    qtbot.waitUntil(window.isActiveWindow, timeout=5_000)
    before = len(node.get("/api/chats").json())
    qtbot.keyClick(window, Qt.Key.Key_N, Qt.KeyboardModifier.ControlModifier)
    qtbot.waitUntil(lambda: window.chat.chat_id is not None, timeout=10_000)
    assert len(node.get("/api/chats").json()) == before + 1 and window.tabs.currentWidget() is window.chat
    window.chat.max_tokens.setValue(2048)
    window.chat.input.setPlainText("a long answer please")
    window.chat.send()
    qtbot.waitUntil(lambda: window.chat.pieces >= 2, timeout=60_000)
    qtbot.keyClick(window.chat.input, Qt.Key.Key_Escape)
    assert window.chat.stream is None and window.chat.messages[-1].status == "stopped"
    assert window.chat.info.text().startswith("Stopped")
    qtbot.waitUntil(
        lambda: (
            node.get(f"/api/chats/{window.chat.chat_id}").json()["messages"][-1]["status"] in ("stopped", "complete")
        ),
        timeout=30_000,
    )


def test_keyboard_tab_order_and_shortcuts_in_every_pane(qtbot, window):
    from PySide6.QtGui import QKeySequence, QShortcut
    from PySide6.QtWidgets import (
        QAbstractButton,
        QAbstractItemView,
        QAbstractSlider,
        QAbstractSpinBox,
        QApplication,
        QComboBox,
        QGraphicsView,
        QLineEdit,
        QMenu,
        QPlainTextEdit,
        QWidget,
    )

    qtbot.waitUntil(lambda: window.contribute.state.text() == "Contributing", timeout=60_000)
    window.activateWindow()
    qtbot.waitUntil(window.isActiveWindow, timeout=5_000)

    def tabbing(start, steps: int) -> list:
        start.setFocus()
        seen = [QApplication.focusWidget()]
        for _ in range(steps):
            qtbot.keyClick(QApplication.focusWidget(), Qt.Key.Key_Tab)
            seen.append(QApplication.focusWidget())
        return seen

    def in_order(seen: list, expected: list) -> bool:
        """The expected controls that can take focus now come in this order, none skipped."""
        wanted = [w for w in expected if w.isEnabled() and w.isVisibleTo(window)]
        return [w for w in seen if w in wanted][: len(wanted)] == wanted

    # Ctrl+1..4 switch panes and put the keyboard where the pane's work starts.
    c, s, st = window.contribute, window.swarm, window.stats
    for key, pane, first in (
        (Qt.Key.Key_2, window.chat, window.chat.input),
        (Qt.Key.Key_3, s, s.map),
        (Qt.Key.Key_4, st, st.range_buttons[st.range]),
        (Qt.Key.Key_1, c, c.pause_button),
    ):
        qtbot.keyClick(window, key, Qt.KeyboardModifier.ControlModifier)
        assert window.tabs.currentWidget() is pane and QApplication.focusWidget() is first, pane.accessibleName()

    # Tab walks each pane's controls in reading order.
    chain = [c.start_button, c.pause_button, c.resume_button, c.stop_button, c.invite, c.copy_invite]
    chain += [c.log_button, c.device, c.blocks, c.apply_button]
    assert in_order(tabbing(c.pause_button, 8), chain)
    window.tabs.setCurrentWidget(window.chat)
    ch = window.chat
    assert in_order(
        tabbing(ch.new_button, 6),
        [ch.new_button, ch.search, ch.chats, ch.model_picker, ch.settings_toggle, ch.privacy_picker],
    )
    assert in_order(tabbing(ch.input, 1), [ch.input, ch.send_button])
    window.tabs.setCurrentWidget(s)
    assert in_order(tabbing(s.fit_button, 2), [s.fit_button, s.map, s.peers])
    # The range buttons are one exclusive group (like radio buttons): Tab stops once, on the checked one.
    window.tabs.setCurrentWidget(st)
    seen = tabbing(st.range_buttons[st.range], 1)
    assert seen[1] not in st.range_buttons.values()

    # Alt mnemonics on the pane's buttons; Ctrl+0 fits the map; Ctrl+P pauses and resumes from anywhere.
    window.tabs.setCurrentWidget(st)
    qtbot.keyClick(window, Qt.Key.Key_7, Qt.KeyboardModifier.AltModifier)
    qtbot.waitUntil(lambda: st.range == "7d", timeout=5_000)  # a mnemonic clicks after a short animation
    qtbot.keyClick(window, Qt.Key.Key_2, Qt.KeyboardModifier.AltModifier)
    qtbot.waitUntil(lambda: st.range == "24h", timeout=5_000)
    qtbot.keyClick(window, Qt.Key.Key_0, Qt.KeyboardModifier.ControlModifier)
    assert window.tabs.currentWidget() is s and s.map._fitted
    qtbot.keyClick(window, Qt.Key.Key_P, Qt.KeyboardModifier.ControlModifier)
    qtbot.waitUntil(lambda: window.status.contribution.state == "paused", timeout=60_000)
    qtbot.keyClick(window, Qt.Key.Key_P, Qt.KeyboardModifier.ControlModifier)
    qtbot.waitUntil(lambda: window.status.contribution.state != "paused", timeout=60_000)

    # No key is bound twice (Qt would then fire neither), and every shortcut is in a menu or a pane.
    menus = window.menuBar().findChildren(QMenu)
    keys = [seq.toString() for menu in menus for action in menu.actions() for seq in action.shortcuts()]
    keys += [shortcut.key().toString() for shortcut in window.findChildren(QShortcut)]
    assert len(keys) == len(set(keys)), keys
    assert {"Ctrl+N", "Ctrl+P", "Ctrl+1", "Ctrl+4", "F5", "Ctrl+F", "F2", "Ctrl+R", "Ctrl+0", "Ctrl+K"} <= set(keys)
    assert QKeySequence("Esc").toString() in keys and QKeySequence("Del").toString() in keys

    # Every control the keyboard can reach says what it is.
    kinds = (QAbstractButton, QLineEdit, QComboBox, QAbstractSpinBox, QAbstractSlider, QAbstractItemView)
    kinds += (QGraphicsView, QPlainTextEdit)
    unnamed = [
        w
        for w in window.findChildren(QWidget)
        if isinstance(w, kinds)
        and w.focusPolicy() & Qt.FocusPolicy.TabFocus
        and not w.accessibleName()
        and not (isinstance(w, QAbstractButton) and w.text())
        and w.window() is window
        and not type(w).__module__.startswith("pyqtgraph")
        and w.objectName() != "qt_spinbox_lineedit"  # a spin box's own line edit: the box itself is named
    ]
    assert not unnamed, [(type(w).__name__, w.objectName()) for w in unnamed]


def test_markdown_code_copy_and_no_markup_from_the_model(qtbot, window):
    from PySide6.QtCore import QUrl
    from PySide6.QtGui import QGuiApplication

    window.tabs.setCurrentWidget(window.chat)
    transcript = window.chat.transcript
    transcript.set_messages(
        [
            Turn(id="q", role="user", content="<i>mine</i>", status="complete", tokens=0, created_at=time.time()),
            Turn(
                id="a",
                role="assistant",
                content="# Title\n\n**bold** <img src=x> <b>raw</b>\n\n```python\nprint('hi')\n```\n",
                status="complete",
                tokens=0,
                created_at=time.time(),
            ),
        ]
    )
    text = transcript.toPlainText()
    assert "<i>mine</i>" in text and "<b>raw</b>" in text and "<img src=x>" in text and "**bold**" not in text
    assert transcript.code_blocks == ["print('hi')"]
    transcript._anchor(QUrl("copy:0"))
    assert QGuiApplication.clipboard().text() == "print('hi')"

    # Streaming keeps the reader's place: scrolled up stays put, at the bottom follows the reply.
    reply = transcript.messages[-1]
    reply.content = "\n\n".join(f"paragraph {i}" for i in range(200))
    transcript.flush()
    bar = transcript.verticalScrollBar()
    assert bar.maximum() > 1000
    bar.setValue(bar.maximum())
    reply.content += "\n\nmore"
    transcript.flush()
    assert bar.value() == bar.maximum()
    bar.setValue(40)
    reply.content += "\n\neven more"
    transcript.flush()
    assert bar.value() == 40 and transcript.toPlainText().rstrip().endswith("even more")


def test_rename_search_delete_with_undo_and_export(qtbot, window, node, tmp_path):
    chat = node.post("/api/chats", json={"title": "Pelican facts"}).json()
    node.post(f"/api/chats/{chat['id']}/messages", json={"content": "zebra crossing", "max_new_tokens": 2}).read()
    window.tabs.setCurrentWidget(window.chat)
    window.chat.refresh_chats()
    qtbot.waitUntil(lambda: any(c.id == chat["id"] for c in window.chat.chat_list), timeout=10_000)
    window.chat.rename_chat(chat["id"], "Birds <3")
    qtbot.waitUntil(lambda: node.get(f"/api/chats/{chat['id']}").json()["title"] == "Birds <3", timeout=10_000)

    window.chat.search.setText("zebra")  # found by a message's content
    qtbot.waitUntil(lambda: [c.id for c in window.chat.chat_list] == [chat["id"]], timeout=10_000)
    window.chat.search.setText("no such words anywhere")
    qtbot.waitUntil(lambda: window.chat.chat_list == [], timeout=10_000)
    window.chat.search.clear()
    qtbot.waitUntil(lambda: any(c.id == chat["id"] for c in window.chat.chat_list), timeout=10_000)

    markdown, data = tmp_path / "chat.md", tmp_path / "chat.json"
    window.chat.export_chat(chat["id"], markdown, "md")
    window.chat.export_chat(chat["id"], data, "json")
    qtbot.waitUntil(lambda: markdown.exists() and data.exists(), timeout=10_000)
    assert markdown.read_text().startswith("# Birds <3") and "## You\n\nzebra crossing" in markdown.read_text()
    exported = json.loads(data.read_text())
    assert exported["title"] == "Birds <3" and exported["messages"][0]["content"] == "zebra crossing"

    window.chat.delete_chat(chat["id"])  # hidden at once, deleted only when the undo time is over
    assert all(c.id != chat["id"] for c in window.chat.chat_list) and window.chat.undo_bar.isVisibleTo(window)
    window.chat.undo_button.click()
    qtbot.waitUntil(lambda: any(c.id == chat["id"] for c in window.chat.chat_list), timeout=10_000)
    assert node.get(f"/api/chats/{chat['id']}").status_code == 200
    window.chat.delete_chat(chat["id"])
    window.chat.commit_delete()
    qtbot.waitUntil(lambda: node.get(f"/api/chats/{chat['id']}").status_code == 404, timeout=10_000)


def test_pause_explains_resume_in_chat_and_counters_stay(qtbot, window, node):
    qtbot.waitUntil(lambda: window.contribute.state.text() == "Contributing", timeout=60_000)
    qtbot.waitUntil(lambda: "tokens," in window.contribute.fields["lifetime"].text(), timeout=30_000)
    qtbot.waitUntil(lambda: "by 1 server" in window.chat.model_picker.itemText(0), timeout=60_000)
    window.contribute.pause_button.click()
    qtbot.waitUntil(lambda: window.contribute.state.text() == "Paused", timeout=60_000)
    # The chat's model list follows the pause at once (the swarm polls every 30 s with the chat shown):
    # with the only server paused, the private swarm cannot be read, and the list no longer says it serves.
    paused_note = "No server to reach while contribution is paused"
    qtbot.waitUntil(lambda: window.chat.model_picker.itemText(0) == paused_note, timeout=10_000)
    assert "start contributing" in window.chat.model_picker.toolTip()
    window.refresh_swarm()  # a later read, failing the same way, says the same
    qtbot.wait(1500)
    assert window.chat.model_picker.itemText(0) == paused_note
    lifetime = node.status()["lifetime"]
    assert lifetime["tokens_served"] > 0  # all-time counters do not drop with the paused server
    assert f"{lifetime['tokens_served']:,} tokens" in window.contribute.fields["lifetime"].text()
    assert window.contribute.resume_button.isEnabled()
    # Pause kept the model loaded: the same server waits, and freeing its memory is still on offer.
    assert node.status()["contribution"]["model_kept"] and window.contribute.free_button.isEnabled()

    window.tabs.setCurrentWidget(window.chat)
    _chat = node.post("/api/chats", json={"title": "paused"}).json()
    window.chat.chat_id = _chat["id"]
    window.chat.messages = []
    window.chat.input.setPlainText("are you there?")
    window.chat.send()
    qtbot.waitUntil(lambda: window.chat.stream is None and bool(window.chat.messages), timeout=60_000)
    qtbot.waitUntil(lambda: window.chat.messages[-1].error_action == "resume", timeout=60_000)
    assert "Resume contributing" in window.chat.transcript.toPlainText()
    window.chat.transcript.resume_requested.emit()  # the inline "Resume contributing" link
    assert window.chat.info.text().startswith("Resuming contributing…")  # it says what it does
    qtbot.waitUntil(lambda: window.contribute.state.text() == "Contributing", timeout=120_000)
    qtbot.waitUntil(lambda: "by 1 server" in window.chat.model_picker.itemText(0), timeout=10_000)
    # ... and asks the question again once this computer serves: the answer comes without a Retry.
    qtbot.waitUntil(
        lambda: window.chat.stream is None and window.chat.messages[-1].status == "complete", timeout=120_000
    )
    stored = node.get(f"/api/chats/{_chat['id']}").json()["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant"] and stored[-1]["status"] == "complete"


def test_settings_are_remembered(qtbot, node, prefs):
    first = MainWindow(NodeClient(node.url, node.token), prefs=prefs)
    qtbot.addWidget(first)
    first.show()
    first.resize(780, 560)
    first.chat.temperature.setValue(0.7)
    first.chat.max_tokens.setValue(2048)
    first.tabs.setCurrentWidget(first.swarm)
    first.save_state()
    assert first.chat.max_tokens.maximum() == 2048 and "2048" in first.chat.max_tokens.toolTip()
    again = MainWindow(NodeClient(node.url, node.token), prefs=prefs)
    qtbot.addWidget(again)
    assert again.chat.temperature.value() == pytest.approx(0.7)
    assert again.chat.max_tokens.value() == 2048
    assert again.tabs.currentWidget() is again.swarm
    assert (again.width(), again.height()) == (780, 560)


def test_max_tokens_matches_the_node():
    from corolla.api.models import MAX_NEW_TOKENS as NODE_MAX
    from corolla.gui.panes.chat import MAX_NEW_TOKENS

    assert MAX_NEW_TOKENS == NODE_MAX


QUIT_SCRIPT = r"""
import sys
from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QApplication
app = QApplication([])
from corolla.gui.node_client import NodeClient
from corolla.gui.prefs import open_prefs
from corolla.gui.tray import Tray
from corolla.gui.window import MainWindow
window = MainWindow(NodeClient(sys.argv[1], sys.argv[2]), prefs=open_prefs(sys.argv[3]))
window.tray = Tray(window, window.show_window, window.show_window, lambda _: None, window.quit_app)
window.tray.show()
app.setQuitOnLastWindowClosed(False)  # as with a tray host
window.show()
def close_then_quit():
    window.close()  # with a tray, closing only hides
    print("hidden" if window.isHidden() and not window.quitting else "not hidden", flush=True)
    window.show()
    QTimer.singleShot(300, window.quit_app)
QTimer.singleShot(1500, close_then_quit)  # after a few polls of the node
QTimer.singleShot(20000, lambda: app.exit(3))  # the old bug: the quit was refused
code = app.exec()
print("exit", code, window.isHidden(), flush=True)
window.deleteLater()
app.processEvents()
sys.exit(code)
"""


def test_quit_really_quits_even_with_a_tray(node, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", QUIT_SCRIPT, node.url, node.token, str(tmp_path / "prefs.ini")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split() == ["hidden", "exit", "0", "True"], result.stdout + result.stderr
    assert "Fatal Python error" not in result.stderr


def test_sigterm_quits_the_app(node, tmp_path):
    """`corolla app` ends on SIGTERM (a logout, `kill`) as its Quit does; the CLI's raising handler alone
    was swallowed by the Qt slot it interrupted and the app lived on."""
    (node.home / "config" / "app-first-run-done").write_text("1")
    env = {**os.environ, "COROLLA_HOME": str(node.home), "QT_QPA_PLATFORM": "offscreen"}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg")
    app = subprocess.Popen([sys.executable, "-m", "corolla.cli", "app"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(4)  # past the start: the window is open on the running node
        assert app.poll() is None
        app.send_signal(signal.SIGTERM)
        assert app.wait(20) == 128 + signal.SIGTERM
        assert "Fatal Python error" not in app.stderr.read()
    finally:
        if app.poll() is None:
            app.kill()
            app.wait()
    assert node.status()["contribution"]["state"] == "online"  # the node is its own process: it keeps on


def test_a_second_app_on_the_same_node_hands_over_and_another_home_is_another_instance(node, tmp_path):
    """`corolla app` is one window per node: started again for the same home it hands over to the running
    one and exits; a different COROLLA_HOME (a portable install, another node) is an instance of its own."""
    from corolla.gui.app import _instance_name
    from corolla.node.paths import NodePaths

    (node.home / "config" / "app-first-run-done").write_text("1")
    env = {**os.environ, "COROLLA_HOME": str(node.home), "QT_QPA_PLATFORM": "offscreen"}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg")
    command = [sys.executable, "-m", "corolla.cli", "app"]
    first = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    try:
        time.sleep(4)  # past the start: the first app listens for others
        assert first.poll() is None
        second = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
        assert second.wait(30) == 0  # handed over
        assert first.poll() is None
    finally:
        first.terminate()
        first.wait(20)
    other = NodePaths(tmp_path / "b" / "config", tmp_path / "b" / "data", tmp_path / "b" / "cache")
    this = NodePaths(node.home / "config", node.home / "data", node.home / "cache")
    assert _instance_name(this) == _instance_name(this) != _instance_name(other)


def test_plain_text_everywhere_for_swarm_and_error_text(qtbot, window):
    from PySide6.QtWidgets import QLabel

    hostile = "<img src='http://evil/x.png'><a href='x'>click</a>"
    status = {
        "version": "0.1.0",
        "pid": 1,
        "started_at": 0.0,
        "model_is_demo": False,
        "model": hostile,
        "swarm": "private",
        "secrets_storage": "keyring",
        "invite": None,
        "awaiting_consent": False,
        "pause_rule": {"rule": "schedule", "message": hostile, "until": "until 22:00"},
        "lifetime": {"tokens_served": 0, "sessions": 0, "uptime_s": 0, "since": None},
        "contribution": {
            "state": "paused",
            "reason": hostile,
            "restarts": 0,
            "last_failure": hostile,
            "start_block": None,
            "end_block": None,
            "throughput": None,
            "cache_bytes_total": 0,
            "cache_bytes_left": 0,
            "tokens_served": 0,
            "sessions_active": 0,
            "sessions_opened": 0,
            "uptime_s": 0,
        },
    }
    window._status_shown(NodeStatus.model_validate(status))
    window._node_unreachable(hostile)
    for label in window.findChildren(QLabel):
        if hostile in label.text():
            assert label.textFormat() == Qt.TextFormat.PlainText, label.objectName()
    assert window.contribute.fields["model"].text() == hostile
    assert window.contribute.rule_banner.text().startswith("Paused by your rule:")


def test_checking_a_server_says_so_when_the_node_cannot(qtbot, window, node):
    """Against the real node: a node without spot checks (no `verification` field, no check endpoint)
    gets a clear message; one with them answers for a peer it does not know with its own message."""
    window.tabs.setCurrentWidget(window.swarm)
    qtbot.waitUntil(lambda: bool(window.swarm.map.boxes_by_peer), timeout=60_000)
    own = next(box.server for box in window.swarm.map.boxes_by_peer.values() if box.server.this_computer)
    window.swarm.selected = own.model_copy(
        update={"this_computer": False, "peer_id": "12D3KooWNotInThisSwarm", "public_name": "x"}
    )
    window.swarm.check_selected()
    assert window.swarm.check_result.isVisibleTo(window) and "Checking x" in window.swarm.check_result.text()
    qtbot.waitUntil(lambda: window.swarm.checking is None, timeout=60_000)
    if own.verification is not None:
        assert window.swarm.check_result.text().startswith("Could not check x: ")
    else:
        assert "cannot check servers: it predates spot checks" in window.swarm.check_result.text()
        assert window.swarm.table.data(window.swarm.table.index(0, 2)) == "–"
        assert window.swarm.peers.isColumnHidden(2)  # no verdicts from this node: no Trust column


def test_the_swarm_map_keeps_the_view_and_reads_at_200_servers(qtbot):
    from corolla.gui.panes.swarm import SwarmPane

    pane = SwarmPane(None, open_prefs(None))
    qtbot.addWidget(pane)
    pane.resize(1000, 700)
    pane.show()
    servers = [
        {
            "peer_id": f"12D3KooW{i:040d}",
            "state": "ONLINE" if i % 7 else "JOINING",
            "start_block": (i * 3) % 70,
            "end_block": (i * 3) % 70 + 10,
            "throughput": 100.0 + i,
            "ping_ms": float(i % 300),
            "using_relay": i % 5 == 0,
            "this_computer": i == 0,
            "version": "2.2.0",
            "corolla_version": None,
            "cache_tokens_left": 1000,
            "public_name": None,
            "torch_dtype": "bfloat16",
            "quant_type": "none",
        }
        for i in range(200)
    ]
    counts = [sum(1 for s in servers if s["start_block"] <= b < s["end_block"]) for b in range(80)]
    model = {
        "dht_prefix": "big-model",
        "num_blocks": 80,
        "servers": servers,
        "online_per_block": counts,
        "healthy": True,
        "missing_blocks": [],
        "route": [{"peer_id": servers[0]["peer_id"], "start": 0, "end": 10}],
    }
    pane.show_swarm([SwarmModel.model_validate(model)])
    graph = pane.map
    assert len(graph.boxes_by_peer) == 200 and len(graph.edges) == 1
    assert graph.transform().m11() >= 0.8  # text stays legible: the view scrolls instead
    rects = [box.rect for box in graph.boxes_by_peer.values()]
    overlapping = sum(1 for i, a in enumerate(rects) for b in rects[i + 1 :] if a.intersects(b))
    assert overlapping == 0
    qtbot.waitUntil(lambda: pane.table.rowCount() == 200, timeout=10_000)
    # Sorting by ping puts the fastest first, numerically, and survives the next refresh.
    pane.peers.sortByColumn(5, Qt.SortOrder.AscendingOrder)
    pings = [pane.table.servers[row].ping_ms for row in range(200)]
    assert pings == sorted(pings)
    # Picking a row pins the server on the map; the selection follows it across refreshes.
    pane.peers.selectRow(3)
    pinned = pane.table.servers[3].peer_id
    assert graph.pinned == pinned and pinned in pane.details.text()
    graph.scale(1.5, 1.5)
    graph.horizontalScrollBar().setValue(100)
    zoom = graph.transform().m11()
    model["servers"] = servers[:150]
    pane.show_swarm([SwarmModel.model_validate(model)])
    qtbot.waitUntil(lambda: pane.table.rowCount() == 150, timeout=10_000)
    assert len(graph.boxes_by_peer) == 150
    assert graph.transform().m11() == zoom  # a live update never resets the view
    assert [pane.table.servers[r].ping_ms for r in range(150)] == sorted(s["ping_ms"] for s in servers[:150])
    selected = pane.peers.selectionModel().selectedRows()
    assert len(selected) == 1 and pane.table.data(selected[0], Qt.ItemDataRole.UserRole) == pinned
    # Hovering a box shows that server's details as the layer's tooltip.
    box = graph.boxes_by_peer[servers[0]["peer_id"]]
    assert graph.layer.box_at(box.rect.center()) is box
    from corolla.gui.swarm_graph import server_details

    assert servers[0]["peer_id"] in server_details(box.server)
    assert "Weakest" in pane.weakest.text()
    # Behind another pane a refresh costs nothing: it is drawn when the pane is shown again.
    pane.hide()
    pane.show_swarm([SwarmModel.model_validate({**model, "servers": servers[:100]})])
    assert len(graph.boxes_by_peer) == 150
    pane.show()
    assert len(graph.boxes_by_peer) == 100
    pane.grab()


def test_tray_states_icons_and_menu(qtbot):
    from PySide6.QtWidgets import QWidget

    from corolla.gui.tray import SIZES, Tray, flower_icon
    from corolla.gui.window import status_line

    assert tray_state("online") == "contributing" and tray_state("paused") == "paused"
    assert tray_state("restarting") == "error" and tray_state("stopped") == "idle"
    assert tray_state(None) == "unreachable"
    icon = flower_icon("contributing")
    assert len(icon.availableSizes()) == len(SIZES)
    image = icon.pixmap(64, 64).toImage()
    assert image.pixelColor(32, 32).name() == "#f4c542"  # the flower's core, not a plain disc
    parent = QWidget()
    qtbot.addWidget(parent)
    calls = []
    tray = Tray(parent, lambda: calls.append("open"), lambda: calls.append("chat"), calls.append, parent.close)
    tray.set_state("paused", status_line(node_status("paused")))
    texts = [a.text() for a in tray.menu.actions()]
    assert texts[0] == "Paused by you" and not tray.menu.actions()[0].isEnabled()
    assert "Resume contributing" in texts and "Quit" in texts
    next(a for a in tray.menu.actions() if a.text() == "Resume contributing").trigger()
    assert calls == [False]
    tray = Tray(
        parent, calls.append, calls.append, calls.append, lambda: calls.append("ask"), lambda: calls.append("stop")
    )
    tray.set_state("contributing", "Contributing blocks 0:6")
    texts = [a.text() for a in tray.menu.actions()]
    assert "Quit…" in texts and "Quit and stop the node" in texts  # the first asks; the second says
    next(a for a in tray.menu.actions() if a.text() == "Quit and stop the node").trigger()
    assert calls[-1] == "stop"


def test_the_window_never_imports_torch_or_hivemind():
    code = (
        "import sys; import corolla.gui.app, corolla.gui.window, corolla.gui.panes; "
        "bad = [m for m in ('torch', 'hivemind', 'transformers', 'pyqtgraph') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def _assert_fits_the_screen(dialog) -> None:
    """The form scrolls and the buttons stay in reach on a small screen (offscreen's is 800x600): the
    first-run dialog was taller than a 900-pixel screen, its buttons below the bottom edge."""
    room = dialog.screen().availableGeometry()
    assert dialog.height() <= room.height(), (dialog.height(), room)
    assert dialog.form_scroll.verticalScrollBar().maximum() > 0  # the form is taller than its view
    assert dialog.save_button.isVisible()


def test_first_run_waits_for_consent_and_a_dead_node_is_restarted(qtbot, tmp_path, monkeypatch, prefs):
    """Nothing is served before the user agrees; after the node dies the window says so and restarts it."""
    from corolla.gui.settings_dialog import SettingsDialog
    from corolla.node.paths import NodePaths

    home = tmp_path / "home"
    process = NodeProcess(home, extra_env={"COROLLA_AWAIT_CONSENT": "1"}, name="consent-node")
    restarted_pid = None
    try:
        time.sleep(3)  # several background ticks: it must still not serve
        status = process.status()
        assert status["awaiting_consent"] and status["contribution"]["state"] == "stopped"
        monkeypatch.setenv("COROLLA_HOME", str(home))
        window = MainWindow(NodeClient(process.url, process.token), prefs=prefs, paths=NodePaths.default())
        qtbot.addWidget(window)
        window.show()
        qtbot.waitUntil(lambda: window.contribute.state.text() == "Waiting for your go-ahead", timeout=20_000)

        dialog = SettingsDialog(window.client, first_run=True)
        qtbot.addWidget(dialog)
        dialog.show()
        qtbot.waitUntil(lambda: dialog.settings is not None, timeout=10_000)
        assert dialog.private.isChecked() and not dialog.invite.isVisible() and not dialog.peers.isVisible()
        _assert_fits_the_screen(dialog)
        # The first run offers the privacy level, with its sentence; "only these peers" asks for them.
        assert dialog.privacy.currentData() == "any" and "can read all of its text" in dialog.privacy_note.text()
        dialog.privacy.setCurrentIndex(dialog.privacy.findData("peers"))
        assert dialog.trusted_peers.isVisible()
        dialog.privacy.setCurrentIndex(dialog.privacy.findData("members"))
        assert not dialog.trusted_peers.isVisible() and "private swarms" in dialog.privacy_note.text()
        dialog.custom.setChecked(True)
        assert dialog.peers.isVisible() and not dialog.invite.isVisible()
        dialog.check_model()
        qtbot.waitUntil(lambda: "this computer can serve" in dialog.model_info.text(), timeout=30_000)
        assert dialog.peers.height() >= 72  # Check no longer squeezes the peers box
        _assert_fits_the_screen(dialog)  # grown for the model's report, still on the screen
        dialog.peers.setPlainText("not-an-address")
        dialog.save()
        assert dialog.error.text().startswith("Custom peers:")
        dialog.private.setChecked(True)
        dialog.window.setText("25:00-26:00")
        dialog.save()
        assert dialog.error.text().startswith("Daily window: write it as HH:MM-HH:MM")
        assert "Value error" not in dialog.error.text()
        dialog.window.setText("")
        assert not dialog.on_battery.isChecked()  # as BOINC: not on battery unless asked
        assert dialog.cpu_percent.isVisibleTo(dialog) and dialog.cpu_percent.value() == 100
        dialog.cpu_percent.setValue(50)  # half the cores: the block server computes with fewer threads
        # Blocks run here: off by default, with the sentence that says how little it protects.
        assert dialog.local_blocks.isVisibleTo(dialog) and dialog.local_blocks.value() == 0
        assert "protects little" in dialog.local_blocks_row.text()
        dialog.local_blocks.setValue(1)
        assert dialog.save_button.text() == "Agree and start contributing"
        assert dialog.save_button.icon().isNull()  # no floppy disk on "Agree"
        assert process.status()["contribution"]["state"] == "stopped"
        with qtbot.waitSignal(dialog.accepted, timeout=30_000):
            dialog.save()
        qtbot.waitUntil(lambda: window.contribute.state.text() in ("Starting…", "Loading the model…", "Contributing"))
        assert not process.status()["awaiting_consent"]
        assert process.get("/api/settings").json()["default_privacy"] == "members"
        assert process.get("/api/settings").json()["cpu_percent"] == 50
        assert process.get("/api/settings").json()["chat_local_blocks"] == 1
        qtbot.waitUntil(lambda: bool(process.status()["contribution"]["pid"]), timeout=60_000)
        server = psutil.Process(process.status()["contribution"]["pid"]).cmdline()
        cores = os.cpu_count() or 1
        assert server[server.index("--num-threads") + 1] == str(max(1, round(cores / 2)))

        process.stop()  # stopped from a terminal
        qtbot.waitUntil(lambda: window.node_banner.isVisible(), timeout=20_000)
        assert "not running" in window.node_banner_text.text()
        assert window.contribute.state.text() == "The node does not answer"
        assert window.banner.text() == "The node does not answer."  # said once, not twice
        window.restart_button.click()
        qtbot.waitUntil(lambda: window.reachable and not window.node_banner.isVisible(), timeout=120_000)
        restarted_pid = json.loads((home / "config" / "node.json").read_text())["pid"]
        assert window.client.url != process.url or restarted_pid != process.process.pid
        log = (home / "data" / "node.log").read_text()  # a node the window starts keeps a log
        assert "started by the window" in log and "corolla node: API on" in log and "\r" not in log
    finally:
        process.stop()
        if restarted_pid is None:
            try:
                restarted_pid = json.loads((home / "config" / "node.json").read_text())["pid"]
            except (OSError, ValueError, KeyError):
                restarted_pid = None
        if restarted_pid and restarted_pid != process.process.pid:
            try:
                os.kill(restarted_pid, signal.SIGTERM)
                for _ in range(200):
                    os.kill(restarted_pid, 0)
                    time.sleep(0.2)
                os.killpg(restarted_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_closing_the_window_leaves_the_node_running(qtbot, window, node):
    window.close()
    assert httpx.get(f"{node.url}/api/ping").status_code == 200


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


def test_friendly_validation_messages():
    from corolla.gui.settings_dialog import friendly_error

    raw = "time_window: Value error, time_window must look like 22:00-07:00"
    assert friendly_error(raw) == "Daily window: must look like 22:00-07:00"
    assert friendly_error("memory_cap_gib: Input should be greater than 0").startswith("Memory: ")


def test_qt_bindings_keep_none_alive():
    """PySide6 6.12.0 on CPython 3.11 drops a reference to None on every call returning nothing; a window
    polling a stopped node then dies with "Fatal Python error: none_dealloc" (pyproject excludes it)."""
    from PySide6.QtWidgets import QLabel

    label = QLabel()
    before = sys.getrefcount(None)
    for _ in range(2000):
        label.setText("x")
    assert sys.getrefcount(None) > before - 100


def _dead_url() -> str:
    """An address where nothing listens: what the window meets while the node is down."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_a_reply_cut_at_the_length_limit_says_so_and_continue_writes_more(qtbot, window, node):
    window.tabs.setCurrentWidget(window.chat)
    window.chat.new_chat()
    qtbot.waitUntil(lambda: window.chat.chat_id is not None and not window.chat.messages, timeout=10_000)
    window.chat.max_tokens.setValue(4)
    finished = _chat_until_done(qtbot, window, "count to one hundred", key_enter=False)
    assert finished[0].finish_reason == "length"  # the random-weight demo model never ends by itself
    first = window.chat.messages[-1].content
    assert "length limit" in window.chat.info.text()
    assert "cut off at the length limit" in window.chat.transcript.toPlainText()
    assert "Continue" in window.chat.transcript.toPlainText()
    stored = node.get(f"/api/chats/{window.chat.chat_id}").json()["messages"][-1]
    assert stored["finish_reason"] == "length" and stored["status"] == "complete"

    finished.clear()
    window.chat.transcript.continue_requested.emit()  # the "Continue" link
    qtbot.waitUntil(lambda: bool(finished) and window.chat.stream is None, timeout=120_000)
    messages = node.get(f"/api/chats/{window.chat.chat_id}").json()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]  # more of the same answer, not a new one
    assert messages[-1]["content"].startswith(first) and len(messages[-1]["content"]) > len(first)
    assert window.chat.messages[-1].content == messages[-1]["content"]


def test_the_node_going_down_keeps_the_conversation_and_clears_what_is_stale(qtbot, window, node):
    qtbot.waitUntil(lambda: window.contribute.state.text() == "Contributing", timeout=60_000)
    qtbot.waitUntil(lambda: window.contribute.fields["throughput"].text() != "–", timeout=60_000)
    window.tabs.setCurrentWidget(window.chat)
    window.chat.new_chat()
    qtbot.waitUntil(lambda: window.chat.chat_id is not None and not window.chat.messages, timeout=10_000)
    window.chat.max_tokens.setValue(4)
    _chat_until_done(qtbot, window, "a question to keep", key_enter=False)
    answer = window.chat.messages[-1].content
    assert answer and "tokens/s" in window.chat.info.text()

    url = window.client.url
    window.client.retarget(_dead_url(), window.client.token)  # the node stops answering
    qtbot.waitUntil(lambda: window.node_banner.isVisibleTo(window), timeout=20_000)
    # Nothing the node said earlier is shown as if it were still true.
    assert window.contribute.fields["throughput"].text() == "–"
    assert window.contribute.fields["uptime"].text() == "–"
    assert not window.contribute.invite_box.isVisibleTo(window)
    assert "not running" in window.swarm.summary.text() and window.swarm.coverage.counts == []
    assert window.chat.model_picker.currentText() == "The node is not running"

    window.chat.retry()  # Retry while the node is down: the conversation stays in view
    qtbot.waitUntil(lambda: window.chat.stream is None, timeout=20_000)
    text = window.chat.transcript.toPlainText()
    assert "a question to keep" in text and answer.strip()[:10] in text
    assert [m.role for m in window.chat.messages] == ["user", "assistant"]
    assert window.chat.messages[-1].status == "complete" and "The reply failed" in text

    window.chat.continue_reply()  # Continue while the node is down: the answer stays, Continue is offered again
    qtbot.waitUntil(lambda: window.chat.stream is None, timeout=20_000)
    assert window.chat.messages[-1].content == answer and window.chat.messages[-1].error_action == "continue"
    assert window.chat.messages[-1].finish_reason == "length" and "Could not continue" in window.chat.info.text()

    window.chat.input.setPlainText("a question that cannot be sent")
    window.chat.send()  # the question is not lost either: it goes back into the box
    qtbot.waitUntil(lambda: window.chat.stream is None, timeout=20_000)
    assert window.chat.input.toPlainText() == "a question that cannot be sent"
    assert window.chat.info.text().startswith("Not sent")
    assert "a question that cannot be sent" not in window.chat.transcript.toPlainText()

    window.client.retarget(url, window.client.token)  # the node is back
    qtbot.waitUntil(lambda: window.reachable and not window.node_banner.isVisibleTo(window), timeout=20_000)
    assert window.chat.info.text() == ""  # no "(Connection refused)" left behind
    qtbot.waitUntil(lambda: window.contribute.fields["throughput"].text() != "–", timeout=30_000)
    stored = node.get(f"/api/chats/{window.chat.chat_id}").json()["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant"] and stored[-1]["content"] == answer

    window.chat.new_chat()  # an empty chat shows no figures from the last reply
    qtbot.waitUntil(lambda: not window.chat.messages and window.chat.info.text() == "", timeout=10_000)


QUIT_ASK_SCRIPT = r"""
import sys
from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QApplication
app = QApplication([])
from corolla.gui.node_client import NodeClient
from corolla.gui.prefs import open_prefs
from corolla.gui.window import MainWindow
from corolla.node.paths import NodePaths
window = MainWindow(NodeClient(sys.argv[1], sys.argv[2]), prefs=open_prefs(sys.argv[3]), paths=NodePaths.default())
window.show()
def answer():
    box = getattr(window, "quit_box", None)
    if box is None or not box.isVisible():
        QTimer.singleShot(100, answer)
        return
    print("asked:", box.informativeText().replace("\n", " "), flush=True)
    box.checkBox().setChecked(True)
    next(b for b in box.buttons() if b.text() == "Stop the node and quit").click()
def ask_when_known():
    # Asked once the window has the node's status: on a busy machine its first poll can take seconds.
    if window.status is None:
        QTimer.singleShot(100, ask_when_known)
        return
    answer()
    window.ask_quit()
QTimer.singleShot(500, ask_when_known)
QTimer.singleShot(30000, lambda: app.exit(3))
code = app.exec()
window.deleteLater()
app.processEvents()
sys.exit(code)
"""


def test_consent_given_another_way_ends_the_welcome_and_quit_can_stop_the_node(tmp_path):
    """The welcome dialog is done with once the node stops waiting, however the user agreed ("Not now",
    then Start, or the chat's link); Quit asks whether the node should stop too, and stops it."""
    home = tmp_path / "home"
    process = NodeProcess(home, extra_env={"COROLLA_AWAIT_CONSENT": "1"}, name="quit-node")
    try:
        env = {**os.environ, "COROLLA_HOME": str(home), "QT_QPA_PLATFORM": "offscreen"}
        env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg")
        marker = home / "config" / "app-first-run-done"
        app = subprocess.Popen([sys.executable, "-m", "corolla.cli", "app"], env=env, stderr=subprocess.DEVNULL)
        try:
            time.sleep(4)  # the window is open, its welcome dialog too: nothing agreed yet
            assert app.poll() is None and not marker.exists()
            process.post("/api/contribution/start")  # as Start on the Contribute tab does
            deadline = time.monotonic() + 30
            while not marker.exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert marker.exists()  # the next start opens no welcome dialog
        finally:
            app.terminate()
            app.wait(20)

        prefs = tmp_path / "quit.ini"
        result = subprocess.run(
            [sys.executable, "-c", QUIT_ASK_SCRIPT, process.url, process.token, str(prefs)],
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
            env={**os.environ, "COROLLA_HOME": str(home)},
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "asked: When the window quits, Corolla's node keeps contributing" in result.stdout, result.stdout
        assert "of memory" in result.stdout  # what staying costs, measured
        assert process.process.wait(60) == 0  # the node stopped, cleanly
        assert "[quit]\nnode=stop" in prefs.read_text()  # remembered: the next Quit does not ask
    finally:
        process.stop()
