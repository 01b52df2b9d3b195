"""Swarm: the health of the model this node serves — coverage per block (weakest marked), the map of
servers and the route, a legend, and every server in a sortable table."""

from __future__ import annotations

import time

from PySide6.QtCore import QSettings, Qt, QTimer
from PySide6.QtGui import QColor, QPainter, QPen
from PySide6.QtWidgets import (
    QHBoxLayout,
    QHeaderView,
    QPushButton,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from corolla.gui import theme
from corolla.gui.node_client import NodeClient
from corolla.gui.swarm_graph import SwarmGraph, server_details, server_label, state_colour
from corolla.gui.widgets import CoverageStrip, block_ranges, plain_label, weakest_blocks

TABLE_SLICE_S = 0.008
PEER_COLUMNS = ["Server", "State", "Blocks", "Tokens/s", "Ping (ms)", "Software", "Link", "Free cache (tokens)"]


class Swatch(QWidget):
    """One legend entry: a filled box, a dashed box or a line, and its meaning."""

    def __init__(self, kind: str, colour: str, text: str, parent: QWidget | None = None):
        super().__init__(parent)
        self.kind, self.colour, self.text = kind, colour, text
        self.setMinimumWidth(24 + self.fontMetrics().horizontalAdvance(text) + 8)
        self.setFixedHeight(18)
        self.setAccessibleName(text)

    def paintEvent(self, event) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        c = theme.colours()
        if self.kind == "line":
            painter.setPen(QPen(QColor(self.colour), 3))
            painter.drawLine(2, 9, 20, 9)
        else:
            pen = QPen(QColor(c.text), 1)
            if self.kind == "dashed":
                pen.setStyle(Qt.PenStyle.DashLine)
            if self.kind == "own":
                pen = QPen(QColor(c.accent), 2.5)
            painter.setPen(pen)
            painter.setBrush(QColor(self.colour))
            painter.drawRect(3, 3, 16, 12)
        painter.setPen(QColor(c.text))
        painter.drawText(24, 13, self.text)
        painter.end()


class SwarmPane(QWidget):
    def __init__(self, client: NodeClient, prefs: QSettings, parent: QWidget | None = None):
        super().__init__(parent)
        self.client, self.prefs = client, prefs
        layout = QVBoxLayout(self)
        layout.setContentsMargins(10, 8, 10, 8)
        self.summary = plain_label("Reading the swarm…")
        self.summary.setStyleSheet("font-size: 15px; font-weight: 600")
        self.summary.setWordWrap(True)
        layout.addWidget(self.summary)
        self.coverage = CoverageStrip()
        self.weakest = plain_label("")
        self.weakest.setObjectName("muted")
        layout.addWidget(self.coverage)
        layout.addWidget(self.weakest)

        c = theme.colours()
        legend = QHBoxLayout()
        for kind, colour, text in (
            ("box", state_colour("ONLINE"), "online"),
            ("box", state_colour("JOINING"), "joining"),
            ("box", state_colour("OFFLINE"), "offline"),
            ("own", state_colour("ONLINE"), "this computer"),
            ("dashed", state_colour("ONLINE"), "relayed"),
            ("line", c.good, "route < 50 ms"),
            ("line", c.warn, "< 200 ms"),
            ("line", c.bad, "≥ 200 ms"),
        ):
            legend.addWidget(Swatch(kind, colour, text))
        legend.addStretch(1)
        self.fit_button = QPushButton("Fit")
        self.fit_button.setToolTip("Show the whole swarm (Ctrl+wheel zooms, drag scrolls)")
        self.fit_button.setAccessibleName("Fit the map to the window")
        legend.addWidget(self.fit_button)
        layout.addLayout(legend)

        self.splitter = QSplitter(Qt.Orientation.Vertical)
        self.splitter.setObjectName("swarmSplitter")
        self.map = SwarmGraph()
        self.fit_button.clicked.connect(self.map.fit)
        self.map.server_clicked.connect(self._show_server)
        self.peers = QTableWidget(0, len(PEER_COLUMNS))
        self.peers.setAccessibleName("Servers")
        self.peers.setHorizontalHeaderLabels(PEER_COLUMNS)
        self.peers.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.peers.setSelectionBehavior(QTableWidget.SelectionBehavior.SelectRows)
        self.peers.verticalHeader().hide()
        self.peers.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        self.peers.horizontalHeader().setStretchLastSection(True)
        self.peers.itemSelectionChanged.connect(self._row_selected)
        self.splitter.addWidget(self.map)
        self.splitter.addWidget(self.peers)
        self.splitter.setSizes([420, 180])
        state = prefs.value("swarm/splitter")
        if state is not None:
            self.splitter.restoreState(state)
        self.splitter.splitterMoved.connect(lambda *_: prefs.setValue("swarm/splitter", self.splitter.saveState()))
        layout.addWidget(self.splitter, 1)
        self.details = plain_label("Hover over a server for details; click it to pin them here.")
        self.details.setWordWrap(True)
        self.details.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout.addWidget(self.details)
        self.models: list[dict] = []
        self.own_prefix: str | None = None
        self._table_rows: list = []
        self._first_fill = True
        self._table_timer = QTimer(self)
        self._table_timer.setInterval(1)  # 1 ms, not 0: other timers and painting get their turn
        self._sort: tuple[int, Qt.SortOrder] | None = None
        self.peers.horizontalHeader().setSectionsClickable(True)
        self.peers.horizontalHeader().sectionClicked.connect(self._sort_by)
        self._table_timer.timeout.connect(self._fill_slice)

    def show_swarm(self, models: list[dict]) -> None:
        self.models = models
        model = next((m for m in models if m["dht_prefix"] == self.own_prefix), models[0] if models else None)
        if model is None:
            self.summary.setText("No model is announced in this swarm yet.")
            self.coverage.set_counts([])
            self.weakest.setText("")
            self.map.set_model(None)
            self.peers.setRowCount(0)
            return
        online = sum(1 for s in model["servers"] if s["state"] == "ONLINE")
        missing = model["missing_blocks"]
        state = "every block is served" if model["healthy"] else f"blocks {block_ranges(missing)} are not served"
        self.summary.setText(
            f"{model['dht_prefix']}: {model['num_blocks']} blocks, {online} of {len(model['servers'])} "
            f"server(s) online — {state}"
        )
        low, weakest = weakest_blocks(model["online_per_block"])
        self.coverage.set_counts(model["online_per_block"])
        if weakest and len(weakest) < len(model["online_per_block"]):
            self.weakest.setText(f"Weakest: blocks {block_ranges(weakest)} with {low} server(s) each")
        else:
            self.weakest.setText(f"Every block has {low} online server(s)")
        self.map.set_model(model)
        # The table on the next turn of the event loop: the map's update and the table's are two
        # short stalls, never one long one.
        self._table_servers = model["servers"]
        QTimer.singleShot(0, lambda: self._fill_table(self._table_servers))

    def _fill_table(self, servers: list[dict]) -> None:
        """Refill the table in short slices between event-loop turns (hundreds of rows would otherwise
        hold the UI thread): no selection signals per cell (each would re-pin the map), no re-sort per
        cell, cells reused (changing text is far cheaper than new items)."""
        self.peers.blockSignals(True)
        self._first_fill = self.peers.rowCount() == 0
        self.peers.setRowCount(len(servers))
        self.peers.blockSignals(False)
        self._table_rows = list(enumerate(servers))
        self._fill_slice()
        if self._table_rows:
            self._table_timer.start()

    def _fill_slice(self) -> None:
        started = time.perf_counter()
        self.peers.blockSignals(True)
        while self._table_rows and time.perf_counter() - started < TABLE_SLICE_S:
            row, s = self._table_rows.pop(0)
            free = (
                s["cache_tokens_left"] // max(2 * (s["end_block"] - s["start_block"]), 1)
                if s.get("cache_tokens_left") is not None
                else None
            )
            software = f"corolla {s['corolla_version']}" if s.get("corolla_version") else f"petals {s.get('version')}"
            cells = [
                server_label(s),
                s["state"].lower(),
                f"{s['start_block']}:{s['end_block']}",
                f"{s['throughput']:.1f}",
                "–" if s.get("ping_ms") is None else f"{s['ping_ms']:.1f}",
                software,
                "relay" if s.get("using_relay") else "direct",
                "?" if free is None else f"{free:,}",
            ]
            for column, text in enumerate(cells):
                item = self.peers.item(row, column)
                if item is None:
                    item = QTableWidgetItem(text)
                    self.peers.setItem(row, column, item)
                elif item.text() != text:
                    item.setText(text)
                item.setData(Qt.ItemDataRole.UserRole, s["peer_id"])
        self.peers.blockSignals(False)
        if not self._table_rows:
            self._table_timer.stop()
            if self._sort is not None:  # only a sort the user asked for (sorting 200 rows is not free)
                self.peers.sortItems(*self._sort)
            if self._first_fill:
                self.peers.resizeColumnsToContents()

    def _sort_by(self, column: int) -> None:
        same = self._sort is not None and self._sort[0] == column
        ascending = Qt.SortOrder.AscendingOrder
        order = Qt.SortOrder.DescendingOrder if same and self._sort[1] == ascending else ascending
        self._sort = (column, order)
        self.peers.horizontalHeader().setSortIndicatorShown(True)
        self.peers.horizontalHeader().setSortIndicator(column, order)
        self.peers.sortItems(column, order)

    def _row_selected(self) -> None:
        items = self.peers.selectedItems()
        if items:
            self.map.pin(items[0].data(Qt.ItemDataRole.UserRole))

    def show_error(self, message: str) -> None:
        self.summary.setText(f"The swarm cannot be read now: {message}")

    def _show_server(self, server: dict) -> None:
        self.details.setText(server_details(server))
