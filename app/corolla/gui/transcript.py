"""The chat transcript: one frame per turn, Markdown rendered (GitHub dialect, raw HTML off: a model's
text can never inject markup), fenced code in monospace with syntax colours and a Copy link, inline
errors with Retry.

A model's text reads as written: a line break is a line break (Markdown would join the lines of a
paragraph, and code written without a fence lost its lines and indentation), leading spaces stay, and
paragraphs have a blank line's gap between them.

Streaming re-renders only the last turn, at most ~25 times a second, and keeps the reader's place:
it follows the reply only when the view was already at the bottom."""

from __future__ import annotations

import re
import time

from PySide6.QtCore import QTimer, QUrl, Signal
from PySide6.QtGui import (
    QColor,
    QDesktopServices,
    QFont,
    QFontDatabase,
    QGuiApplication,
    QTextBlockFormat,
    QTextCharFormat,
    QTextCursor,
    QTextDocument,
    QTextFrameFormat,
    QTextLength,
)
from PySide6.QtWidgets import QTextBrowser, QWidget

from corolla.gui import theme
from corolla.gui.highlight import highlight
from corolla.gui.turns import Turn

MARKDOWN = QTextDocument.MarkdownFeature(
    QTextDocument.MarkdownFeature.MarkdownDialectGitHub.value | QTextDocument.MarkdownFeature.MarkdownNoHTML.value
)
STATUS_NOTE = {"interrupted": "interrupted", "stopped": "stopped by you", "failed": "failed"}
FLUSH_MS = 40
NBSP = "\u00a0"
LINE_BREAK = "\u2028"  # a line break inside a paragraph (Markdown's hard break would start a new block)
LIST_ITEM = re.compile(r"^\s*([-*+]|\d{1,9}[.)])(\s|$)")
# Lines Markdown gives a meaning of their own at the start of a line: never joined, never re-indented.
BLOCK_START = re.compile(r"^\s*(#{1,6}\s|>|\||([-*_=]\s*){3,}$|[-=]+\s*$)")


def stable_end(text: str, start: int) -> int:
    """Where the finished part of a streaming reply ends: after its last blank line that is outside a
    code fence (what comes after may still change as tokens arrive). `start` is a previous answer."""
    end, fence, offset = start, None, start
    for line in text[start:].split("\n")[:-1]:  # the last line is still being written
        stripped = line.strip()
        if fence is None and (stripped.startswith("```") or stripped.startswith("~~~")):
            fence = stripped[:3]
        elif fence is not None and stripped.startswith(fence) and not stripped[3:].strip():
            fence = None
        offset += len(line) + 1
        if fence is None and not stripped:
            end = offset
    return end


def split_fences(text: str) -> list[tuple[str, str, str]]:
    """[(kind, language, body)] with kind "text" or "code"; an unclosed fence (still streaming) runs
    to the end of the text."""
    parts: list[tuple[str, str, str]] = []
    buffer: list[str] = []
    fence: str | None = None
    language = ""
    for line in text.split("\n"):
        stripped = line.strip()
        if fence is None and (stripped.startswith("```") or stripped.startswith("~~~")):
            if buffer:
                parts.append(("text", "", "\n".join(buffer)))
            buffer, fence, language = [], stripped[:3], stripped[3:].strip()
        elif fence is not None and stripped.startswith(fence) and not stripped[3:].strip():
            parts.append(("code", language, "\n".join(buffer)))
            buffer, fence, language = [], None, ""
        else:
            buffer.append(line)
    if fence is not None:
        parts.append(("code", language, "\n".join(buffer)))
    elif buffer and any(b.strip() for b in buffer):
        parts.append(("text", "", "\n".join(buffer)))
    return parts


def readable_markdown(text: str) -> str:
    """Markdown (outside code fences) that keeps the text's own lines: each line break becomes a hard
    break, and a paragraph line's leading spaces become no-break spaces, which Markdown keeps. An indented
    block after a blank line (Markdown's own code block) is fenced, so it shows as code with Copy.
    Lists, quotes, headings and tables keep their Markdown meaning."""
    lines = text.split("\n")
    out: list[str] = []
    in_list = False
    code: list[str] = []

    def flush_code() -> None:
        if code:
            while code and not code[-1].strip():
                code.pop()
            out.extend(["```", *(c[4:] if c.startswith("    ") else c.lstrip("\t") for c in code), "```", ""])
            code.clear()

    for i, line in enumerate(lines):
        expanded = line.replace("\t", "    ")
        stripped = expanded.strip()
        previous_blank = i == 0 or not lines[i - 1].strip()
        indent = len(expanded) - len(expanded.lstrip(" "))
        if code and (not stripped or indent >= 4):
            code.append(expanded)
            continue
        flush_code()
        if not stripped:
            out.append("")
            continue
        if LIST_ITEM.match(expanded):
            in_list = True
        elif previous_blank and indent == 0:
            in_list = False
        if previous_blank and indent >= 4 and not in_list:
            code.append(expanded)
            continue
        if indent and not in_list and not LIST_ITEM.match(expanded) and not BLOCK_START.match(expanded):
            expanded = NBSP * indent + expanded.lstrip(" ")
        if in_list and out and out[-1].endswith(LINE_BREAK):
            expanded = expanded.lstrip(" ")  # a list item's next line: its indentation is the list's
        line_end = "\n"
        following = lines[i + 1] if i + 1 < len(lines) else ""
        if following.strip() and not any(p.match(x) for p in (BLOCK_START, LIST_ITEM) for x in (following, expanded)):
            line_end = LINE_BREAK  # the next line continues this paragraph: on a line of its own
        elif following.strip() and in_list and LIST_ITEM.match(expanded) and not LIST_ITEM.match(following):
            line_end = LINE_BREAK  # a list item's own next line
        out.append(expanded.rstrip() + line_end)
    flush_code()
    return "".join(line if line.endswith((LINE_BREAK, "\n")) else line + "\n" for line in out).rstrip("\n")


class Transcript(QTextBrowser):
    retry_requested = Signal()
    resume_requested = Signal()
    continue_requested = Signal()

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setOpenLinks(False)
        self.setOpenExternalLinks(False)
        self.setAccessibleName("Conversation")
        self.anchorClicked.connect(self._anchor)
        self.code_blocks: list[str] = []
        self.messages: list[Turn] = []
        self._tail_start: int | None = None
        self._tail_index = -1  # which message _tail_start is the start of
        self._tail_code_start = 0
        self._open: dict | None = None  # the streaming turn: its frame, where its open part starts
        self._flush = QTimer(self)
        self._flush.setSingleShot(True)
        self._flush.setInterval(FLUSH_MS)
        self._flush.timeout.connect(self._render_tail)
        self.mono = QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont)

    # --- public -------------------------------------------------------------------------------------
    def set_messages(self, messages: list[Turn], empty_text: str = "") -> None:
        """Render the whole conversation (a chat was opened or reloaded)."""
        self.messages = messages
        at_bottom = self._at_bottom()
        keep = self.verticalScrollBar().value()
        self.document().clear()
        self.code_blocks = []
        self._tail_start = None
        self._tail_index = len(messages) - 1
        self.document().setDocumentMargin(12)
        if not messages and empty_text:
            cursor = self.textCursor()
            fmt = QTextCharFormat()
            fmt.setForeground(QColor(theme.colours().muted))
            cursor.insertText(empty_text, fmt)
        for index, message in enumerate(messages):
            if index == len(messages) - 1:
                self._tail_start = self._end_position()
            self._insert_turn(message)
        bar = self.verticalScrollBar()
        bar.setValue(bar.maximum() if at_bottom else keep)

    def update_last(self) -> None:
        """The last message changed (a streamed piece): re-render it soon, once per frame at most."""
        if not self._flush.isActive():
            self._flush.start()

    def flush(self) -> None:
        self._flush.stop()
        self._render_tail()

    # --- rendering ----------------------------------------------------------------------------------
    def _at_bottom(self) -> bool:
        bar = self.verticalScrollBar()
        return bar.value() >= bar.maximum() - 4

    def _end_position(self) -> int:
        cursor = QTextCursor(self.document())
        cursor.movePosition(QTextCursor.MoveOperation.End)
        return cursor.position()

    def _render_tail(self) -> None:
        if not self.messages:
            return
        if self._tail_start is None or self._tail_index != len(self.messages) - 1:
            self.set_messages(self.messages)  # a turn was added or removed since: draw them all
            return
        bar = self.verticalScrollBar()
        at_bottom, keep = self._at_bottom(), bar.value()
        message = self.messages[-1]
        cut = message.finish_reason == "length"  # its header note and Continue: the whole turn again
        if self._open is not None and message.status in ("streaming", "complete") and not message.error and not cut:
            self._render_open(message.content)  # only the part still being written
            if message.status == "complete":
                self._open = None
        else:
            cursor = QTextCursor(self.document())
            cursor.beginEditBlock()  # one layout pass for the removal and the new text: no flicker, no jump
            cursor.setPosition(self._tail_start)
            cursor.movePosition(QTextCursor.MoveOperation.End, QTextCursor.MoveMode.KeepAnchor)
            cursor.removeSelectedText()
            del self.code_blocks[self._tail_code_start :]
            self._insert_turn(message, cursor)
            cursor.endEditBlock()
        bar.setValue(bar.maximum() if at_bottom else keep)

    def _render_open(self, text: str) -> None:
        """Streaming: paragraphs (and closed code blocks) that are finished are rendered once; only the
        open one is replaced on each update, so a long reply costs the same per token as a short one."""
        state = self._open
        frame = state["frame"]
        cursor = QTextCursor(self.document())
        cursor.beginEditBlock()
        cursor.setPosition(state["pos"])
        cursor.setPosition(frame.lastPosition(), QTextCursor.MoveMode.KeepAnchor)
        cursor.removeSelectedText()
        del self.code_blocks[state["code_mark"] :]
        end = stable_end(text, state["stable"])
        if end > state["stable"]:
            self._insert_markdown(cursor, text[state["stable"] : end], frame)
            state.update(pos=cursor.position(), stable=end, code_mark=len(self.code_blocks))
        if text[state["stable"] :].strip():
            self._insert_markdown(cursor, text[state["stable"] :], frame)
        elif not text:
            muted = QTextCharFormat()
            muted.setForeground(QColor(theme.colours().muted))
            cursor.insertText("…", muted)
        cursor.endEditBlock()

    def _insert_turn(self, message: Turn, cursor: QTextCursor | None = None) -> None:
        c = theme.colours()
        user = message.role == "user"
        cursor = cursor or QTextCursor(self.document())
        cursor.movePosition(QTextCursor.MoveOperation.End)
        self._tail_code_start = len(self.code_blocks)
        frame_format = QTextFrameFormat()
        frame_format.setBackground(QColor(c.user_bubble if user else c.assistant_bubble))
        frame_format.setPadding(10)
        frame_format.setTopMargin(4)
        frame_format.setBottomMargin(8)
        frame_format.setLeftMargin(60 if user else 0)
        frame_format.setRightMargin(0 if user else 40)
        frame_format.setBorder(0)
        frame_format.setWidth(QTextLength(QTextLength.Type.PercentageLength, 100))
        turn = cursor.insertFrame(frame_format)
        header = QTextCharFormat()
        header.setFontWeight(QFont.Weight.Bold)
        header.setForeground(QColor(c.text))
        cursor.insertText("You" if user else "Assistant", header)
        meta = QTextCharFormat()
        meta.setForeground(QColor(c.muted))
        when = time.strftime("%H:%M", time.localtime(message.created_at or time.time()))
        note = STATUS_NOTE.get(message.status, "")
        cut = message.status == "complete" and message.finish_reason == "length"
        if cut:
            note = "cut off at the length limit"
        cursor.insertText(f"   {when}" + (f" · {note}" if note else ""), meta)
        cursor.insertBlock()
        cursor.setCharFormat(QTextCharFormat())
        content = message.content
        self._open = None
        if user:
            cursor.insertText(content, QTextCharFormat())  # the user's own words, exactly as typed
        elif message.status == "streaming" and not message.error:
            self._open = {"frame": turn, "pos": cursor.position(), "stable": 0, "code_mark": len(self.code_blocks)}
            self._render_open(content)
        else:
            self._insert_markdown(cursor, content, turn)
        if message.error:
            cursor.setPosition(turn.lastPosition())
            self._insert_error(cursor, message.error, message.error_action or "retry")
        elif cut and message is (self.messages[-1] if self.messages else None):
            cursor.setPosition(turn.lastPosition())
            self._insert_continue(cursor)

    def _insert_markdown(self, cursor: QTextCursor, text: str, parent) -> None:
        """Insert at the end of `parent` (the turn's frame); the cursor ends there too."""
        c = theme.colours()
        parts = [
            part
            for kind, language, body in split_fences(text)
            for part in (split_fences(readable_markdown(body)) if kind == "text" else [(kind, language, body)])
        ]
        for kind, language, body in parts:
            cursor.setPosition(parent.lastPosition())
            if kind == "text":
                if not body.strip():
                    continue
                start = cursor.position()
                cursor.insertMarkdown(body.strip("\n"), MARKDOWN)
                self._space_paragraphs(start, cursor.position())
                continue
            index = len(self.code_blocks)
            self.code_blocks.append(body)
            code_frame = QTextFrameFormat()
            code_frame.setBackground(QColor(c.code_background))
            code_frame.setBorder(1)
            code_frame.setBorderBrush(QColor(c.border))
            code_frame.setPadding(8)
            code_frame.setTopMargin(6)
            code_frame.setBottomMargin(6)
            code_frame.setWidth(QTextLength(QTextLength.Type.PercentageLength, 100))
            if not cursor.block().text():  # a reply that opens with code: no empty line above its frame
                flat = cursor.blockFormat()
                flat.setLineHeight(0, QTextBlockFormat.LineHeightTypes.FixedHeight.value)
                flat.setBottomMargin(0)
                cursor.setBlockFormat(flat)
            cursor.insertFrame(code_frame)
            label = QTextCharFormat()
            label.setForeground(QColor(c.muted))
            cursor.insertText((language or "code") + "   ", label)
            link = QTextCharFormat()
            link.setAnchor(True)
            link.setAnchorHref(f"copy:{index}")
            link.setForeground(QColor(c.accent))
            link.setFontUnderline(True)
            cursor.insertText("Copy", link)
            cursor.insertBlock()
            for piece, colour, bold, italic in highlight(body, language, c.dark):
                code = QTextCharFormat()
                code.setFont(self.mono)
                code.setForeground(QColor(colour or c.text))
                if bold:
                    code.setFontWeight(QFont.Weight.Bold)
                code.setFontItalic(italic)
                cursor.insertText(piece, code)
        cursor.setPosition(parent.lastPosition())

    def _space_paragraphs(self, start: int, end: int) -> None:
        """A blank line's gap after each paragraph (Qt's Markdown import leaves only a few pixels, so
        paragraphs ran together); list items stay close, with the gap after the list."""
        gap = self.fontMetrics().lineSpacing() * 0.7
        block = self.document().findBlock(start)
        while block.isValid() and block.position() <= end:
            following = block.next()
            if not block.text():  # the empty blocks around a code frame keep no gap of their own
                block = following
                continue
            fmt = block.blockFormat()
            in_list = block.textList() is not None
            next_in_same_list = in_list and following.isValid() and following.textList() is block.textList()
            fmt.setTopMargin(0)
            fmt.setBottomMargin(2 if next_in_same_list else gap)
            cursor = QTextCursor(block)
            cursor.setBlockFormat(fmt)
            block = following

    def _insert_error(self, cursor: QTextCursor, text: str, action: str) -> None:
        c = theme.colours()
        cursor.insertBlock()
        error = QTextCharFormat()
        error.setForeground(QColor(c.bad))
        cursor.insertText(text + "  ", error)
        link = QTextCharFormat()
        link.setAnchor(True)
        link.setAnchorHref(f"{action}:")
        link.setForeground(QColor(c.accent))
        link.setFontUnderline(True)
        link.setFontWeight(QFont.Weight.Bold)
        links = {"resume": "Resume contributing", "start": "Start contributing", "continue": "Continue"}
        cursor.insertText(links.get(action, "Retry"), link)

    def _insert_continue(self, cursor: QTextCursor) -> None:
        c = theme.colours()
        cursor.insertBlock()
        meta = QTextCharFormat()
        meta.setForeground(QColor(c.muted))
        cursor.insertText("The answer reached the length limit before it was finished.  ", meta)
        link = QTextCharFormat()
        link.setAnchor(True)
        link.setAnchorHref("continue:")
        link.setForeground(QColor(c.accent))
        link.setFontUnderline(True)
        link.setFontWeight(QFont.Weight.Bold)
        cursor.insertText("Continue", link)

    # --- links --------------------------------------------------------------------------------------
    def _anchor(self, url: QUrl) -> None:
        scheme = url.scheme()
        if scheme == "copy":
            index = int(url.path() or -1) if (url.path() or "").isdigit() else -1
            if 0 <= index < len(self.code_blocks):
                QGuiApplication.clipboard().setText(self.code_blocks[index])
        elif scheme == "retry":
            self.retry_requested.emit()
        elif scheme in ("resume", "start"):
            self.resume_requested.emit()  # the node's resume starts a server that never started
        elif scheme == "continue":
            self.continue_requested.emit()
        elif scheme in ("http", "https"):
            QDesktopServices.openUrl(url)  # only web links leave the window; no file: or custom schemes
