"""Small shared widgets: a plain-text label (nothing from the swarm or an error is ever read as rich
text), a scroll area that keeps a tall form on the screen, and the per-block coverage strip above the
swarm map."""

from __future__ import annotations

from PySide6.QtCore import QRectF, QSize, Qt
from PySide6.QtGui import QColor, QPainter, QPen
from PySide6.QtWidgets import QFrame, QLabel, QScrollArea, QSizePolicy, QToolTip, QWidget

from corolla.api.models import RouteHop
from corolla.gui import theme


def plain_label(text: str = "", parent: QWidget | None = None) -> QLabel:
    """A QLabel that shows its text literally: model names, peer data and error messages may contain
    '<' and must never become markup (or links, or images) in the window."""
    label = QLabel(parent)
    label.setTextFormat(Qt.TextFormat.PlainText)
    label.setText(text)
    return label


def sentence(text: str) -> str:
    """A message as a sentence: a capital first letter and a full stop ("the node answered 404" ->
    "The node answered 404.")."""
    text = text.strip()
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?", "…", ":")) else text + "."


def plural(n: int, noun: str) -> str:
    """plural(1, "session") -> "1 session"; plural(3, "token") -> "3 tokens" (thousands separated)."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def block_span(start: int | None, end: int | None) -> str:
    """The blocks a server holds, as people count them on the map's strip: (0, 30) -> "blocks 0–29"."""
    if start is None or end is None:
        return ""
    return f"block {start}" if end - start == 1 else f"blocks {start}–{end - 1}"


def route_text(route: list[RouteHop]) -> str:
    """The route's hops -> "blocks 0–29 from the server …21r58S" (one hop) or "3 servers: …"."""
    hops = [f"{block_span(r.start, r.end)} from …{r.peer_id[-6:]}" for r in route]
    if len(hops) == 1:
        return hops[0].replace(" from …", " from the server …")
    return f"{len(hops)} servers: " + ", ".join(hops) if hops else ""


def weakest_blocks(online_per_block: list[int]) -> tuple[int, list[int]]:
    """(the fewest servers any block has, the blocks with that few)."""
    if not online_per_block:
        return 0, []
    low = min(online_per_block)
    return low, [i for i, n in enumerate(online_per_block) if n == low]


def block_ranges(blocks: list[int]) -> str:
    """[0, 1, 2, 5] -> "0–2, 5"."""
    ranges, start = [], None
    for i, b in enumerate(blocks):
        if start is None:
            start = b
        if i + 1 == len(blocks) or blocks[i + 1] != b + 1:
            ranges.append(str(start) if start == b else f"{start}–{b}")
            start = None
    return ", ".join(ranges)


SCREEN_SHARE = 0.85  # of the screen's free height a dialog's form may take; the buttons stay below it


class ScreenFittingScroll(QScrollArea):
    """Holds a form as tall as it needs up to most of the screen's free height, and scrolls beyond it.
    A dialog taller than the screen (the first-run dialog on a 768-pixel laptop) would put its buttons
    out of reach."""

    def __init__(self, content: QWidget, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWidget(content)
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)

    def sizeHint(self) -> QSize:
        wanted = self.widget().sizeHint()
        screen = (self.window().screen() if self.window() else None) or self.screen()
        room = int(screen.availableGeometry().height() * SCREEN_SHARE) if screen else wanted.height()
        scrollbar = self.verticalScrollBar().sizeHint().width()
        return QSize(wanted.width() + scrollbar, min(wanted.height(), room))


class CoverageStrip(QWidget):
    """One cell per block, coloured by how many online servers hold it; the weakest blocks outlined."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.counts: list[int] = []
        self.left_margin = 0
        self.setMouseTracking(True)
        self.setFixedHeight(34)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setAccessibleName("Servers per block")

    def set_counts(self, counts: list[int]) -> None:
        self.counts = list(counts)
        low, weakest = weakest_blocks(self.counts)
        self.setToolTip(
            f"Fewest servers on a block: {low} (blocks {block_ranges(weakest)})" if self.counts else "No swarm data"
        )
        self.update()

    def _cell(self) -> float:
        return (self.width() - 8) / max(len(self.counts), 1)

    def mouseMoveEvent(self, event) -> None:
        if not self.counts:
            return
        block = int((event.position().x() - 4) // self._cell())
        if 0 <= block < len(self.counts):
            n = self.counts[block]
            QToolTip.showText(
                event.globalPosition().toPoint(), f"block {block}: {n} online server{'s' if n != 1 else ''}", self
            )

    def paintEvent(self, event) -> None:
        c = theme.colours()
        painter = QPainter(self)
        painter.fillRect(self.rect(), self.palette().window())
        if not self.counts:
            painter.setPen(QColor(c.muted))
            painter.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter, "No swarm data yet")
            return
        cell = self._cell()
        _low, weakest = weakest_blocks(self.counts)
        weak = set(weakest)
        peak = max(max(self.counts), 1)
        for block, n in enumerate(self.counts):
            rect = QRectF(4 + block * cell, 4, max(cell - 1, 1), 18)
            if n == 0:
                colour = QColor(c.bad)
            else:
                colour = QColor(c.good)
                colour.setAlphaF(0.35 + 0.65 * n / peak)
            painter.fillRect(rect, colour)
            if block in weak and len(weak) < len(self.counts):
                painter.setPen(QPen(QColor(c.warn if n else c.bad), 2))
                painter.drawRect(rect.adjusted(1, 1, -1, -1))
        painter.setPen(QColor(c.muted))
        painter.drawText(QRectF(4, 22, self.width() - 8, 12), Qt.AlignmentFlag.AlignLeft, "block 0")
        painter.drawText(
            QRectF(4, 22, self.width() - 8, 12), Qt.AlignmentFlag.AlignRight, f"block {len(self.counts) - 1}"
        )
        painter.end()
