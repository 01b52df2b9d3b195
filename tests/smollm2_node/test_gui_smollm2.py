"""The window's chat pane against a node serving the real default model: it answers the capital of
France (greedy) and names the model (pytest-qt, offscreen)."""

from __future__ import annotations

import pytest

pytest.importorskip("PySide6")
pytestmark = pytest.mark.slow

from corolla.gui.node_client import NodeClient  # noqa: E402
from corolla.gui.window import MainWindow  # noqa: E402


def test_the_chat_pane_answers_paris(qtbot, node):
    window = MainWindow(NodeClient(node.url, node.token))
    qtbot.addWidget(window)
    window.show()
    qtbot.waitUntil(lambda: window.contribute.state.text() == "Contributing", timeout=120_000)
    assert "SmolLM2-135M-Instruct" in window.contribute.fields["model"].text()
    # The picker marks the node's own model (its prefix comes from the model card: not part of the name).
    qtbot.waitUntil(lambda: "(this node's model)" in window.chat.model_picker.currentText(), timeout=60_000)
    window.tabs.setCurrentWidget(window.chat)
    window.chat.temperature.setValue(0.0)  # greedy
    window.chat.input.setPlainText("What is the capital of France?")
    finished = []
    window.chat.reply_finished.connect(finished.append)
    window.chat.send()
    qtbot.waitUntil(lambda: bool(finished) and window.chat.stream is None, timeout=180_000)
    assert finished[0].status == "complete"
    assert "Paris" in window.chat.messages[-1].content
    assert "Paris" in window.chat.transcript.toPlainText()
    # A second message in the same chat continues the same swarm session (SmolLM2's pad token is its
    # chat template's <|im_end|>: a mask inferred from it used to fail every second turn).
    finished.clear()
    window.chat.max_tokens.setValue(24)
    window.chat.input.setPlainText("And what is the capital of Italy?")
    window.chat.send()
    assert window.chat.stream is not None
    qtbot.waitUntil(lambda: window.chat.stream is None, timeout=180_000)  # finished, or failed inline
    assert finished and finished[0].status == "complete", window.chat.info.text()
    assert [m.role for m in window.chat.messages] == ["user", "assistant", "user", "assistant"]
    assert window.chat.messages[-1].content.strip()
