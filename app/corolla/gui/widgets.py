"""Custom-painted views: the swarm's block coverage map and the contribution bar chart."""

from __future__ import annotations

from PySide6.QtCore import QRectF, Qt, Signal
from PySide6.QtGui import QColor, QFont, QPainter, QPen
from PySide6.QtWidgets import QSizePolicy, QToolTip, QWidget

STATE_COLOURS = {"ONLINE": QColor("#3fa66b"), "JOINING": QColor("#e0a526"), "OFFLINE": QColor("#9a9a9a")}
OWN_OUTLINE = QColor("#1f6fd1")


class CoverageMap(QWidget):
    """Blocks across, servers down (as Petals' health monitor draws it); this computer's row outlined."""

    server_clicked = Signal(dict)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.model: dict | None = None
        self.setMouseTracking(True)
        self.setMinimumHeight(120)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)

    def set_model(self, model: dict | None) -> None:
        self.model = model
        rows = len(model["servers"]) if model else 0
        self.setMinimumHeight(60 + 22 * max(rows, 1))
        self.update()

    def _geometry(self):
        blocks = max(self.model["num_blocks"], 1)
        left, top = 150, 30
        cell = max(4.0, (self.width() - left - 10) / blocks)
        return blocks, left, top, cell

    def _row_at(self, y: float) -> int | None:
        if not self.model:
            return None
        _, _, top, _ = self._geometry()
        row = int((y - top) // 22)
        return row if 0 <= row < len(self.model["servers"]) else None

    def mouseMoveEvent(self, event) -> None:
        row = self._row_at(event.position().y())
        if row is None:
            QToolTip.hideText()
            return
        s = self.model["servers"][row]
        software = f"corolla {s['corolla_version']}" if s.get("corolla_version") else f"petals {s.get('version')}"
        ping = "-" if s.get("ping_ms") is None else f"{s['ping_ms']:.1f} ms"
        QToolTip.showText(
            event.globalPosition().toPoint(),
            (
                f"{s['peer_id']}\n{s['state']} · blocks {s['start_block']}:{s['end_block']}\n"
                f"{s['throughput']:.1f} tokens/s · {software} · {'relay' if s.get('using_relay') else 'direct'}\n"
                f"ping {ping} · {s.get('torch_dtype') or '?'} {s.get('quant_type') or ''}"
            ),
            self,
        )

    def mousePressEvent(self, event) -> None:
        row = self._row_at(event.position().y())
        if row is not None:
            self.server_clicked.emit(self.model["servers"][row])

    def paintEvent(self, event) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        painter.fillRect(self.rect(), self.palette().base())
        if not self.model:
            painter.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter, "No swarm data yet")
            return
        blocks, left, top, cell = self._geometry()
        painter.setFont(QFont(self.font().family(), 8))
        painter.setPen(self.palette().text().color())
        for block in range(blocks):  # coverage strip: online servers per block
            count = self.model["online_per_block"][block] if block < len(self.model["online_per_block"]) else 0
            colour = QColor("#c0392b") if count == 0 else QColor("#3fa66b").lighter(100 + 25 * max(0, 3 - count))
            painter.fillRect(QRectF(left + block * cell, 8, cell - 1, 14), colour)
        painter.drawText(QRectF(4, 8, left - 8, 14), Qt.AlignmentFlag.AlignVCenter, "online per block")
        for row, server in enumerate(self.model["servers"]):
            y = top + row * 22
            label = "★ this computer" if server.get("this_computer") else "…" + server["peer_id"][-8:]
            painter.setPen(self.palette().text().color())
            painter.drawText(QRectF(4, y, left - 8, 18), Qt.AlignmentFlag.AlignVCenter, label)
            colour = STATE_COLOURS.get(server["state"], QColor("#9a9a9a"))
            rect = QRectF(
                left + server["start_block"] * cell, y + 2, (server["end_block"] - server["start_block"]) * cell - 1, 14
            )
            painter.fillRect(rect, colour)
            if server.get("this_computer"):
                painter.setPen(QPen(OWN_OUTLINE, 2))
                painter.drawRect(rect)
        painter.end()


class BarChart(QWidget):
    """Bars of one value per hour, with the peak labelled."""

    def __init__(self, title: str, parent: QWidget | None = None):
        super().__init__(parent)
        self.title, self.values, self.labels = title, [], []
        self.setMinimumHeight(140)

    def set_values(self, values: list[float], labels: list[str]) -> None:
        self.values, self.labels = values, labels
        self.update()

    def paintEvent(self, event) -> None:
        painter = QPainter(self)
        painter.fillRect(self.rect(), self.palette().base())
        painter.setPen(self.palette().text().color())
        painter.drawText(QRectF(6, 2, self.width() - 12, 18), Qt.AlignmentFlag.AlignLeft, self.title)
        if not self.values:
            painter.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter, "no contribution recorded yet")
            return
        peak = max(max(self.values), 1e-9)
        area = QRectF(6, 22, self.width() - 12, self.height() - 40)
        width = area.width() / len(self.values)
        for i, value in enumerate(self.values):
            height = area.height() * value / peak
            painter.fillRect(
                QRectF(area.left() + i * width + 1, area.bottom() - height, max(width - 2, 1), height),
                QColor("#3f7fd6"),
            )
        painter.drawText(
            QRectF(6, self.height() - 16, self.width() - 12, 14),
            Qt.AlignmentFlag.AlignLeft,
            f"{self.labels[0]} … {self.labels[-1]}   peak {peak:,.0f}",
        )
        painter.end()
