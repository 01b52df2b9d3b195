"""How the window looks and reads, without a node: the theme switch, outlines on dark, wording, long
titles (pytest-qt, offscreen)."""

from __future__ import annotations

import pytest

pytest.importorskip("PySide6")

from PySide6.QtGui import QColor, QPalette
from PySide6.QtWidgets import QApplication, QCheckBox, QRadioButton, QWidget

from corolla.api.models import Chat, RouteHop
from corolla.gui import theme
from corolla.gui.node_client import NodeClient
from corolla.gui.prefs import open_prefs
from corolla.gui.widgets import block_span, plural, route_text, sentence
from corolla.gui.window import MainWindow, quit_question
from corolla.testing.statuses import node_status

NOWHERE = "http://127.0.0.1:9"  # nothing listens: these tests need no node


@pytest.fixture
def restore_theme(monkeypatch):
    monkeypatch.delenv("COROLLA_THEME", raising=False)
    yield
    theme.set_choice("system")
    theme.apply(QApplication.instance())


def _lightness(widget: QWidget, x: int, y: int) -> int:
    return widget.grab().toImage().pixelColor(x, y).lightness()


def test_the_theme_switch_is_immediate_and_remembered(qtbot, tmp_path, restore_theme):
    prefs = open_prefs(str(tmp_path / "window.ini"))
    window = MainWindow(NodeClient(NOWHERE, "t"), prefs=prefs)
    qtbot.addWidget(window)
    window.set_theme("dark")
    assert theme.is_dark() and QApplication.instance().palette().color(QPalette.ColorRole.Window).lightness() < 80
    assert [a.data() for a in window.theme_actions.actions() if a.isChecked()] == ["dark"]
    window.set_theme("light")
    assert not theme.is_dark()
    window.set_theme("dark")
    theme.set_choice("system")  # a new start reads the choice back
    again = MainWindow(NodeClient(NOWHERE, "t"), prefs=prefs)
    qtbot.addWidget(again)
    assert theme.choice() == "dark" and theme.is_dark()


def test_check_boxes_and_radio_buttons_are_outlined_on_dark(qtbot, restore_theme):
    theme.set_choice("dark")
    theme.apply(QApplication.instance())
    window = QColor("#26272b").lightness()
    for kind in (QCheckBox, QRadioButton):
        box = kind("an option")
        qtbot.addWidget(box)
        box.resize(160, 24)
        image = box.grab().toImage()
        # The brightest pixel of the indicator's square (the left 20 px) stands well out of the window.
        brightest = max(image.pixelColor(x, y).lightness() for x in range(20) for y in range(24))
        assert brightest > window + 80, (kind.__name__, brightest)


def test_words_for_people():
    assert plural(1, "server") == "1 server" and plural(3, "session") == "3 sessions"
    assert block_span(0, 30) == "blocks 0–29" and block_span(4, 5) == "block 4"
    assert route_text([RouteHop(start=0, end=30, peer_id="12D3KooW21r58S")]) == "blocks 0–29 from the server …21r58S"
    assert sentence("the node answered 404") == "The node answered 404."
    assert sentence("Stopped.") == "Stopped."
    asked = quit_question(node_status("online"), 2 * 1024**3)
    assert "keeps contributing" in asked and "2.0 GiB" in asked


def test_long_chat_titles_end_in_an_ellipsis_not_a_sideways_scroll(qtbot, tmp_path):
    window = MainWindow(NodeClient(NOWHERE, "t"), prefs=open_prefs(str(tmp_path / "window.ini")))
    qtbot.addWidget(window)
    window.resize(900, 600)
    window.show()
    title = "A very long chat title that goes on and on about pelicans, herons and every other bird " * 2
    window.chat._show_chats([Chat(id="c1", title=title, model=None, system_prompt=None, created_at=0, updated_at=0)])
    qtbot.waitUntil(lambda: window.chat.chats.count() == 1)
    assert window.chat.chats.horizontalScrollBar().maximum() == 0
    assert window.chat.chats.item(0).toolTip().startswith(title)
