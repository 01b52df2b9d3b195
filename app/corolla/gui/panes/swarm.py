"""Swarm: the health of the model this node serves — coverage per block (weakest marked), the map of
servers and the route, a legend, every server in a sortable table with the node's verdict on it
(spot checks), and "Check this server" for the one selected."""

from __future__ import annotations

from PySide6.QtCore import QItemSelectionModel, QModelIndex, QSettings, Qt, QTimer, Signal
from PySide6.QtGui import QBrush, QColor, QPainter, QPen
from PySide6.QtWidgets import (
    QAbstractItemView,
    QHBoxLayout,
    QHeaderView,
    QPushButton,
    QSplitter,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from corolla.api import routes
from corolla.api.models import CheckServer, ServerCheck, SwarmModel, SwarmServer
from corolla.gui import theme
from corolla.gui.node_client import ENDPOINT_MISSING, NodeClient
from corolla.gui.panes.swarm_table import PEER_COLUMNS, ServerTable
from corolla.gui.swarm_graph import (
    SwarmGraph,
    evidence_text,
    server_details,
    server_label,
    state_colour,
    verification,
)
from corolla.gui.widgets import CoverageStrip, block_ranges, plain_label, plural, sentence, weakest_blocks

CHECK_TIMEOUT_MS = 180_000  # a check runs the server's blocks and compares them: allow for a slow swarm


class Swatch(QWidget):
    """One legend entry: a filled box, a dashed box, a hatched box or a line, and its meaning."""

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
            if self.kind == "flagged":
                pen = QPen(QColor(c.bad), 2.5)
            painter.setPen(pen)
            painter.setBrush(QColor(self.colour))
            painter.drawRect(3, 3, 16, 12)
            if self.kind == "flagged":
                painter.fillRect(3, 3, 16, 12, QBrush(QColor(c.bad), Qt.BrushStyle.BDiagPattern))
        painter.setPen(QColor(c.text))
        painter.drawText(24, 13, self.text)
        painter.end()


class SwarmPane(QWidget):
    checked = Signal(object)  # the ServerCheck of a server was checked on purpose: the node's verdict may have changed

    def __init__(self, client: NodeClient, prefs: QSettings, parent: QWidget | None = None):
        super().__init__(parent)
        self.client, self.prefs = client, prefs
        layout = QVBoxLayout(self)
        layout.setContentsMargins(10, 8, 10, 8)
        self.summary = plain_label("Reading the swarm…")
        self.summary.setStyleSheet("font-size: 15px; font-weight: 600")
        self.summary.setWordWrap(True)
        self.summary.setAccessibleName("Swarm summary")
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
            ("flagged", state_colour("ONLINE"), "⚠ flagged"),
            ("line", c.good, "route < 50 ms"),
            ("line", c.warn, "< 200 ms"),
            ("line", c.bad, "≥ 200 ms"),
        ):
            legend.addWidget(Swatch(kind, colour, text))
        legend.addStretch(1)
        self.fit_button = QPushButton("&Fit")
        self.fit_button.setToolTip("Show the whole swarm (Ctrl+0). Ctrl+wheel or Ctrl++ / Ctrl+- zoom; drag scrolls")
        self.fit_button.setAccessibleName("Fit the map to the window")
        legend.addWidget(self.fit_button)
        layout.addLayout(legend)

        self.splitter = QSplitter(Qt.Orientation.Vertical)
        self.splitter.setObjectName("swarmSplitter")
        self.map = SwarmGraph()
        self.map.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
        self.fit_button.clicked.connect(self.map.fit)
        self.map.server_clicked.connect(self._server_pinned)
        self.table = ServerTable(self)
        self.peers = QTableView()
        self.peers.setModel(self.table)
        self.peers.setAccessibleName("Servers")
        self.peers.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.peers.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.peers.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.peers.setTabKeyNavigation(False)  # Tab leaves the table; arrows move between servers
        self.peers.verticalHeader().hide()
        header = self.peers.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        header.setStretchLastSection(True)
        header.setResizeContentsPrecision(40)  # fit columns to the first rows, not all 200
        header.setSortIndicator(-1, Qt.SortOrder.AscendingOrder)
        self.peers.setSortingEnabled(True)
        header.setSortIndicatorShown(False)  # no sort until the user asks (the node's order otherwise)
        header.sectionClicked.connect(lambda _: header.setSortIndicatorShown(True))
        self.peers.selectionModel().currentRowChanged.connect(self._row_selected)
        self.splitter.addWidget(self.map)
        self.splitter.addWidget(self.peers)
        self.splitter.setSizes([420, 180])
        state = prefs.value("swarm/splitter")
        if state is not None:
            self.splitter.restoreState(state)
        self.splitter.splitterMoved.connect(lambda *_: prefs.setValue("swarm/splitter", self.splitter.saveState()))
        layout.addWidget(self.splitter, 1)

        bottom = QHBoxLayout()
        self.details = plain_label(
            "Hover over a server for details; click it (or pick it in the table) to pin them here."
        )
        self.details.setWordWrap(True)
        self.details.setAccessibleName("Server details")
        self.details.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.check_button = QPushButton("Chec&k this server")
        self.check_button.setAccessibleName("Check the selected server's results")
        self.check_button.setToolTip(
            "Send the selected server known inputs and compare its answer with this computer's own run of "
            "those blocks or with other servers (Ctrl+K)"
        )
        self.check_button.setEnabled(False)
        self.check_button.clicked.connect(self.check_selected)
        bottom.addWidget(self.details, 1)
        bottom.addWidget(self.check_button, 0, Qt.AlignmentFlag.AlignTop)
        layout.addLayout(bottom)
        self.check_result = plain_label("")
        self.check_result.setWordWrap(True)
        self.check_result.setAccessibleName("Check result")
        self.check_result.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.check_result.hide()
        layout.addWidget(self.check_result)

        # Ctrl+0, Ctrl++ / Ctrl+-, Ctrl+K: the window's Swarm menu.
        self.setTabOrder(self.fit_button, self.map)
        self.setTabOrder(self.map, self.peers)
        self.setTabOrder(self.peers, self.check_button)

        self.models: list[SwarmModel] = []
        self.own_prefix: str | None = None
        self.own_name: str | None = None  # the node's embedded model's name, shown for its prefix
        self.selected: SwarmServer | None = None
        self.checking: str | None = None
        self._table_servers: list[SwarmServer] = []
        self._table_queued = False
        self._stale = False
        self._sized_for: str | None = None

    def focus_first(self) -> None:
        self.map.setFocus()

    def showEvent(self, event) -> None:
        super().showEvent(event)
        if self._stale:
            self.show_swarm(self.models)

    # --- data ---------------------------------------------------------------------------------------
    def show_swarm(self, models: list[SwarmModel]) -> None:
        self.models = models
        if not self.isVisible():
            # Drawn when the pane is shown: a refresh behind another pane (a chat streaming, the window in
            # the tray) costs the UI thread nothing.
            self._stale = True
            return
        self._stale = False
        model = next((m for m in models if m.dht_prefix == self.own_prefix), models[0] if models else None)
        if model is None:
            self.summary.setText("No model is announced in this swarm yet.")
            self.coverage.set_counts([])
            self.weakest.setText("")
            self.map.set_model(None)
            self._table_servers = []
            self._update_table()
            return
        servers = model.servers
        online = sum(1 for s in servers if s.state == "ONLINE")
        missing = model.missing_blocks
        state = "every block is served" if model.healthy else f"blocks {block_ranges(missing)} are not served"
        flagged = sum(1 for s in servers if (v := verification(s)) is not None and v.state == "flagged")
        warning = f" — ⚠ {plural(flagged, 'server')} flagged for wrong results" if flagged else ""
        name = self.own_name if model.dht_prefix == self.own_prefix and self.own_name else model.dht_prefix
        self.summary.setToolTip(f"In the swarm: {model.dht_prefix}")
        self.summary.setText(
            f"{name}: {model.num_blocks} blocks, {online} of {plural(len(servers), 'server')} online — {state}{warning}"
        )
        low, weakest = weakest_blocks(model.online_per_block)
        self.coverage.set_counts(model.online_per_block)
        if weakest and len(weakest) < len(model.online_per_block):
            self.weakest.setText(f"Weakest: blocks {block_ranges(weakest)}, with {plural(low, 'server')} each")
        else:
            self.weakest.setText(f"Every block has {plural(low, 'online server')}")
        self.map.set_model(model)
        # The table on the next turn of the event loop: the map's update and the table's are two
        # short stalls, never one longer one.
        self._table_servers = servers
        if not self._table_queued:
            self._table_queued = True
            QTimer.singleShot(0, self._update_table)
        if self.selected is not None:
            fresh = self.map.boxes_by_peer.get(self.selected.peer_id)
            if fresh is not None:
                self.selected = fresh.server
                if self.checking is None:
                    self.details.setText(server_details(fresh.server))

    def _update_table(self) -> None:
        self._table_queued = False
        self.table.set_servers(self._table_servers)
        self._reselect()
        # Columns fit their contents once per model shown (not per refresh: the user may have resized them).
        prefix = self.map.model.dht_prefix if self.map.model is not None else None
        if self._table_servers and prefix != self._sized_for:
            self._sized_for = prefix
            for column in range(len(PEER_COLUMNS) - 1):  # the last one stretches to the table's edge
                self.peers.resizeColumnToContents(column)
        # A node that does not check servers has no verdicts: no Trust column rather than a column of "–".
        checked = any(verification(s) is not None for s in self._table_servers)
        self.peers.setColumnHidden(PEER_COLUMNS.index("Trust"), not checked)

    def _reselect(self) -> None:
        """Keep the pinned server selected in the table across refreshes (rows move when sorted)."""
        selection = self.peers.selectionModel()
        row = self.table.row_of(self.map.pinned)
        selection.blockSignals(True)
        if row < 0:
            selection.clearSelection()
        else:
            index = self.table.index(row, 0)
            flags = QItemSelectionModel.SelectionFlag.ClearAndSelect | QItemSelectionModel.SelectionFlag.Rows
            selection.setCurrentIndex(index, flags)
        selection.blockSignals(False)
        self.peers.viewport().update()

    def _row_selected(self, current: QModelIndex, _previous: QModelIndex) -> None:
        if current.isValid():
            self.map.pin(self.table.data(current, Qt.ItemDataRole.UserRole))

    def show_error(self, message: str) -> None:
        self.summary.setText(f"The swarm cannot be read now. {sentence(message)}")

    def show_unreachable(self) -> None:
        """The node is not running: the swarm it saw is not shown as if it were current."""
        self.models, self._stale = [], False  # nothing to redraw when shown: this is what it shows
        self.summary.setText("The node is not running, so the swarm cannot be seen from here.")
        self.coverage.set_counts([])
        self.weakest.setText("")
        self.map.set_model(None)
        self._table_servers = []
        self._update_table()

    def _server_pinned(self, server: SwarmServer) -> None:
        self.selected = server
        self.details.setText(server_details(server))
        self._reselect()
        own = server.this_computer
        self.check_button.setEnabled(self.checking is None and not own)
        self.check_button.setToolTip(
            "This is this computer's own server: a server is never checked against itself."
            if own
            else "Send this server known inputs and compare its answer with this computer's own run of those "
            "blocks or with other servers (Ctrl+K)"
        )

    # --- checking a server on purpose ---------------------------------------------------------------
    def check_selected(self) -> None:
        """Ask the node to check the selected server (it runs beside everything else: the request is
        asynchronous and the window stays responsive); show its verdict when it comes."""
        server = self.selected
        if server is None or self.checking is not None or server.this_computer:
            return
        peer = server.peer_id
        self.checking = peer
        self.check_button.setEnabled(False)
        self.check_button.setText("Checking…")
        self.check_result.setStyleSheet("")
        self.check_result.setText(f"Checking {server_label(server)}: sending it known inputs…")
        self.check_result.show()
        self.client.call(
            "POST",
            routes.SWARM_CHECK,
            {"peer_id": peer},
            on_ok=lambda result: self._checked(server, result),
            on_error=lambda message: self._check_failed(server, message),
            timeout_ms=CHECK_TIMEOUT_MS,
            answer=ServerCheck,
            request=CheckServer,
        )

    def _check_done(self) -> None:
        self.checking = None
        self.check_button.setText("Chec&k this server")
        self.check_button.setEnabled(self.selected is not None and not self.selected.this_computer)

    def _checked(self, server: SwarmServer, result: ServerCheck) -> None:
        self._check_done()
        state = result.state
        c = theme.colours()
        headline = {
            "verified": "✓ Honest",
            "flagged": "⚠ FLAGGED: it returned wrong results",
            "unverified": "Could not be verified",
        }.get(state, str(state or "No verdict"))
        parts = [f"{server_label(server)}: {headline}."]
        if result.detail:
            parts.append(result.detail[:500])
        if result.max_error is not None:
            parts.append(f"Largest difference: {result.max_error:.3g}.")
        compared = result.compared_with
        if compared:
            names = ", ".join(str(p) if len(str(p)) < 16 else "…" + str(p)[-6:] for p in compared[:6])
            parts.append(f"Compared with: {names}.")
        evidence = evidence_text(result.evidence)
        if evidence:
            parts.append(evidence.replace("\n", "; "))
        colour = {"verified": c.good, "flagged": c.bad}.get(state, c.warn)
        self.check_result.setStyleSheet(f"color: {colour}")
        self.check_result.setText(" ".join(parts))
        self.checked.emit(result)

    def _check_failed(self, server: SwarmServer, message: str) -> None:
        self._check_done()
        self.check_result.setStyleSheet(f"color: {theme.colours().warn}")
        if message == ENDPOINT_MISSING:
            self.check_result.setText(
                "This node cannot check servers: it predates spot checks. Update Corolla to check servers on purpose."
            )
        else:
            self.check_result.setText(sentence(f"Could not check {server_label(server)}: {message}"))
