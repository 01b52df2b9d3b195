"""The window reads the swarm (a DHT read and a route on the node) every 5 s only while the Swarm pane
is shown: every 30 s on the other panes, never while hidden, and at once when the pane or the window
is shown again (pytest-qt, offscreen, no node)."""

from __future__ import annotations

import pytest

pytest.importorskip("PySide6")

from corolla.api.models import SwarmModel
from corolla.gui.node_client import NodeClient
from corolla.gui.prefs import open_prefs
from corolla.gui.window import SWARM_POLL_OTHER_PANES, MainWindow

NOWHERE = "http://127.0.0.1:9"  # nothing listens
MODEL = SwarmModel(dht_prefix="tiny", num_blocks=2, online_per_block=[1, 1], servers=[])


@pytest.fixture
def window(qtbot, tmp_path):
    win = MainWindow(NodeClient(NOWHERE, "token"), prefs=open_prefs(str(tmp_path / "window.ini")))
    qtbot.addWidget(win)
    for timer in win._timers:
        timer.stop()  # the test drives the polls itself
    reads: list[str] = []
    win.refresh_swarm = lambda: reads.append(win.tabs.currentWidget().objectName() or "pane")
    win.reads = reads
    return win


def test_the_swarm_is_read_often_only_while_its_pane_is_shown(window):
    window.show()
    window.chat.show_models([MODEL], "tiny")  # the chat knows its models: no hurry elsewhere
    window.tabs.setCurrentWidget(window.chat)
    window.reads.clear()
    for _ in range(SWARM_POLL_OTHER_PANES * 2):
        window._poll_swarm()
    assert len(window.reads) == 2  # every 30 s on the Chat pane

    window.tabs.setCurrentWidget(window.swarm)  # shown: read at once, then on every poll
    assert len(window.reads) == 3
    for _ in range(4):
        window._poll_swarm()
    assert len(window.reads) == 7

    window.hide()
    for _ in range(SWARM_POLL_OTHER_PANES * 2):
        window._poll_swarm()
    assert len(window.reads) == 7  # nobody looks: nothing read
    window.show()
    assert len(window.reads) == 8  # shown again: the map as it is now


def test_a_chat_without_models_keeps_asking(window):
    window.show()
    window.tabs.setCurrentWidget(window.chat)
    window.chat.show_unreachable("The swarm cannot be read yet")
    window.reads.clear()
    for _ in range(3):
        window._poll_swarm()
    assert len(window.reads) == 3
