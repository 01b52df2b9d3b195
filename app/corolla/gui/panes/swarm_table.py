"""The Swarm pane's table of servers: a server's cells, what each column sorts by, and the model the
view reads (only the rows it shows are formatted)."""

from __future__ import annotations

from PySide6.QtCore import QAbstractTableModel, QModelIndex, Qt
from PySide6.QtGui import QColor

from corolla.api.models import SwarmServer
from corolla.gui import theme
from corolla.gui.swarm_graph import server_details, server_label, trust_text, verification
from corolla.gui.widgets import block_ranges

PEER_COLUMNS = [
    "Server",
    "State",
    "Trust",
    "Blocks",
    "Tokens/s",
    "Ping (ms)",
    "Software",
    "Link",
    "Free cache (tokens)",
]


def _free_slots(s: SwarmServer) -> int | None:
    """Free cache in tokens per block pair (what a new session can still get), or None if unannounced."""
    if s.cache_tokens_left is None:
        return None
    return s.cache_tokens_left // max(2 * (s.end_block - s.start_block), 1)


def _software(s: SwarmServer) -> str:
    return f"corolla {s.corolla_version}" if s.corolla_version else f"petals {s.version}"


def row_cells(s: SwarmServer) -> list[str]:
    """A server's cells as the table shows them."""
    free = _free_slots(s)
    return [
        server_label(s),
        s.state.lower(),
        trust_text(s),
        block_ranges(list(range(s.start_block, s.end_block))),  # as the strip counts them: 0–29, not 0:30
        f"{s.throughput:.1f}",
        "–" if s.ping_ms is None else f"{s.ping_ms:.1f}",
        _software(s),
        "relay" if s.using_relay else "direct",
        "?" if free is None else f"{free:,}",
    ]


def sort_key(s: SwarmServer, column: int):
    """What a column sorts by: numbers as numbers, unknown pings last, flagged servers first by trust."""
    if column == 2:
        v = verification(s)
        return {"flagged": 0, "unverified": 1, "verified": 2}.get(v.state if v else None, 1)
    if column == 3:
        return (s.start_block, s.end_block)
    if column == 4:
        return s.throughput
    if column == 5:
        return s.ping_ms if s.ping_ms is not None else float("inf")
    if column == 8:
        free = _free_slots(s)
        return -1 if free is None else free
    return row_cells(s)[column].lower()


class ServerTable(QAbstractTableModel):
    """The servers as rows. A refresh swaps a list and tells the view which rows changed; the view asks
    only for the cells it shows, so 200 servers cost what one screenful costs."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.servers: list[SwarmServer] = []
        self._cells: dict[int, list[str]] = {}  # formatted on demand: the view asks only for visible rows
        self.sort_key: tuple[int, Qt.SortOrder] | None = None

    def rowCount(self, parent=QModelIndex()) -> int:  # noqa: B008 (Qt's signature)
        return 0 if parent.isValid() else len(self.servers)

    def columnCount(self, parent=QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(PEER_COLUMNS)

    def headerData(self, section: int, orientation, role=Qt.ItemDataRole.DisplayRole):
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.DisplayRole:
            return PEER_COLUMNS[section]
        return None

    def data(self, index: QModelIndex, role=Qt.ItemDataRole.DisplayRole):
        if not index.isValid():
            return None
        row, column = index.row(), index.column()
        if role == Qt.ItemDataRole.DisplayRole:
            cells = self._cells.get(row)
            if cells is None:
                cells = self._cells[row] = row_cells(self.servers[row])
            return cells[column]
        if role == Qt.ItemDataRole.UserRole:
            return self.servers[row].peer_id
        if role == Qt.ItemDataRole.ForegroundRole and column == 2:
            v = verification(self.servers[row])
            if v and v.state == "flagged":
                return QColor(theme.colours().bad)
            if v and v.state == "verified":
                return QColor(theme.colours().good)
        if role == Qt.ItemDataRole.ToolTipRole and column == 2:
            return server_details(self.servers[row])
        return None

    def set_servers(self, servers: list[SwarmServer]) -> None:
        if self.sort_key is not None:
            column, direction = self.sort_key
            servers = sorted(
                servers, key=lambda s: sort_key(s, column), reverse=direction == Qt.SortOrder.DescendingOrder
            )
        old, new = len(self.servers), len(servers)
        if new < old:
            self.beginRemoveRows(QModelIndex(), new, old - 1)
        elif new > old:
            self.beginInsertRows(QModelIndex(), old, new - 1)
        self.servers = list(servers)
        self._cells = {}
        if new < old:
            self.endRemoveRows()
        elif new > old:
            self.endInsertRows()
        if new:
            self.dataChanged.emit(self.index(0, 0), self.index(new - 1, len(PEER_COLUMNS) - 1))

    def sort(self, column: int, order=Qt.SortOrder.AscendingOrder) -> None:
        if column < 0:  # no sort asked for: keep the node's order
            self.sort_key = None
            return
        self.sort_key = (column, order)
        self.layoutAboutToBeChanged.emit()
        self.set_servers(self.servers)
        self.layoutChanged.emit()

    def row_of(self, peer_id: str | None) -> int:
        return next((i for i, s in enumerate(self.servers) if s.peer_id == peer_id), -1)
