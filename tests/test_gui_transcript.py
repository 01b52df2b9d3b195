"""The transcript reads as the model wrote it: line breaks, indentation, paragraphs, code with colours
(pytest-qt, offscreen; no node)."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("PySide6")

from corolla.gui.transcript import LINE_BREAK, Transcript, readable_markdown
from corolla.gui.turns import Turn


def _reply(content: str, **extra) -> Turn:
    fields = {"id": "m1", "role": "assistant", "content": content, "status": "complete", "tokens": 0}
    return Turn(**{**fields, "created_at": time.time(), **extra})


@pytest.fixture
def transcript(qtbot):
    view = Transcript()
    qtbot.addWidget(view)
    view.resize(640, 480)
    view.show()
    return view


def _lines(view: Transcript) -> list[str]:
    return view.toPlainText().replace(LINE_BREAK, "\n").replace("\u00a0", " ").split("\n")


def test_unfenced_code_keeps_its_lines_and_indentation(transcript):
    transcript.set_messages([_reply("Here it is:\ndef f(s):\n    return s[::-1]\nDone.")])
    lines = _lines(transcript)
    assert "def f(s):" in lines and "    return s[::-1]" in lines and "Done." in lines
    assert "Here it is: def f(s):" not in transcript.toPlainText()


def test_an_indented_block_after_a_blank_line_is_code_with_copy(transcript):
    transcript.set_messages([_reply("Code:\n\n    x = 1\n        y = 2\n\nAfter.")])
    assert transcript.code_blocks == ["x = 1\n    y = 2"]
    assert "After." in _lines(transcript)


def test_paragraphs_have_a_gap_and_lines_in_one_do_not(transcript):
    transcript.set_messages([_reply("First paragraph.\nIts second line.\n\nSecond paragraph.")])
    document = transcript.document()
    layout = document.documentLayout()
    blocks = {}
    block = document.begin()
    while block.isValid():
        blocks[block.text()] = block
        block = block.next()
    first = blocks[f"First paragraph.{LINE_BREAK}Its second line."]  # one paragraph, two lines
    second = blocks["Second paragraph."]
    assert first.layout().lineCount() == 2
    gap = layout.blockBoundingRect(second).top() - layout.blockBoundingRect(first).bottom()
    assert gap >= transcript.fontMetrics().lineSpacing() * 0.5, gap


def test_lists_quotes_headings_and_tables_keep_their_markdown_meaning():
    assert readable_markdown("- a\n  - b\n- c") == "- a\n  - b\n- c"
    assert readable_markdown("1. one\n   more\n2. two") == f"1. one{LINE_BREAK}more\n2. two"
    assert readable_markdown("# Title\ntext") == "# Title\ntext"
    table = "| a | b |\n|---|---|\n| 1 | 2 |"
    assert readable_markdown(table) == table
    assert readable_markdown("Setext\n======\nbody") == "Setext\n======\nbody"


def test_code_blocks_are_coloured_by_language_and_plain_when_unknown(transcript):
    transcript.set_messages([_reply("```python\ndef f():\n    return 1\n```\n\n```\ndef g(): pass\n```")])
    document = transcript.document()
    colours: dict[str, set[str]] = {}
    block = document.begin()
    while block.isValid():
        iterator = block.begin()
        while not iterator.atEnd():
            fragment = iterator.fragment()
            colours.setdefault(block.text(), set()).add(fragment.charFormat().foreground().color().name())
            iterator += 1
        block = block.next()
    assert len(colours["def f():"]) > 1  # keyword and name in their own colours
    assert len(colours["def g(): pass"]) == 1  # no language: not guessed at
    assert transcript.code_blocks == ["def f():\n    return 1", "def g(): pass"]


def test_streaming_renders_the_same_as_the_finished_reply(transcript):
    text = "Intro line\nsecond line\n\n    indented code\n\nOutro."
    reply = _reply("", status="streaming")
    transcript.set_messages([reply])
    for end in range(1, len(text) + 1, 3):
        reply.content = text[:end]
        transcript.flush()
    reply.content, reply.status = text, "complete"
    transcript.flush()
    streamed = _lines(transcript)
    transcript.set_messages([_reply(text)])
    assert streamed == _lines(transcript)
    assert transcript.code_blocks == ["indented code"]
