"""The swarm map: a QGraphicsView with this computer, every server laid out by the blocks it serves
(one lane per overlap), and the current route as edges coloured by latency. Updates move and recolour
existing items, so zoom and scroll survive a refresh; 200 servers stay readable (lanes, zoom)."""

from __future__ import annotations

import time

from PySide6.QtCore import QPointF, QRectF, Qt, QTimer, Signal
from PySide6.QtGui import QBrush, QColor, QFont, QPainter, QPainterPath, QPen
from PySide6.QtWidgets import (
    QGraphicsEllipseItem,
    QGraphicsItem,
    QGraphicsPathItem,
    QGraphicsRectItem,
    QGraphicsScene,
    QGraphicsSimpleTextItem,
    QGraphicsView,
    QWidget,
)

from corolla.gui import theme

LANE_H = 30
BOX_H = 24
TOP = 34  # room for the block axis
CLIENT_X = -170
SCENE_W = 900.0
SLICE_S = 0.008  # at most this long per slice of item updates


def latency_colour(ping_ms: float | None) -> str:
    c = theme.colours()
    if ping_ms is None:
        return c.muted
    return c.good if ping_ms < 50 else c.warn if ping_ms < 200 else c.bad


def state_colour(state: str) -> str:
    c = theme.colours()
    return {"ONLINE": c.good, "JOINING": c.warn}.get(state, "#8a8a90")


def assign_lanes(servers: list[dict]) -> dict[str, int]:
    """Interval partitioning: servers sorted by first block; each takes the first lane it fits in."""
    lanes_end: list[int] = []
    lanes: dict[str, int] = {}
    for s in sorted(
        servers, key=lambda s: (not s.get("this_computer"), s["start_block"], -s["end_block"], s["peer_id"])
    ):
        for lane, end in enumerate(lanes_end):
            if end <= s["start_block"]:
                lanes_end[lane] = s["end_block"]
                lanes[s["peer_id"]] = lane
                break
        else:
            lanes_end.append(s["end_block"])
            lanes[s["peer_id"]] = len(lanes_end) - 1
    return lanes


def server_label(s: dict) -> str:
    if s.get("this_computer"):
        return "★ this computer"
    return s.get("public_name") or "…" + s["peer_id"][-6:]


def server_details(s: dict) -> str:
    software = f"corolla {s['corolla_version']}" if s.get("corolla_version") else f"petals {s.get('version')}"
    ping = "–" if s.get("ping_ms") is None else f"{s['ping_ms']:.0f} ms"
    cache = "?" if s.get("cache_tokens_left") is None else f"{s['cache_tokens_left']:,} tokens"
    return (
        f"{server_label(s)}  ({s['peer_id']})\n"
        f"{s['state'].lower()} · blocks {s['start_block']}:{s['end_block']} · {s['throughput']:.1f} tokens/s\n"
        f"ping {ping} · {'relayed (no direct connection)' if s.get('using_relay') else 'direct'} · {software}\n"
        f"{s.get('torch_dtype') or '?'} {s.get('quant_type') or ''} · free cache {cache}"
    )


class ServerItem(QGraphicsRectItem):
    def __init__(self, peer_id: str):
        super().__init__()
        self.peer_id = peer_id
        self.server: dict = {}
        self.pinned = False
        self.setAcceptHoverEvents(True)
        self.setFlag(QGraphicsItem.GraphicsItemFlag.ItemIsSelectable, True)
        self.label = QGraphicsSimpleTextItem(self)
        self.label.setAcceptedMouseButtons(Qt.MouseButton.NoButton)
        # (no item cache: a live update changes many items at once, and re-caching costs more than drawing)

    def update_from(self, server: dict, rect: QRectF, font: QFont) -> None:
        state = (server, rect, self.pinned, theme.is_dark())
        if state == getattr(self, "_shown", None):
            return  # unchanged: a live update of 200 servers touches only what moved
        self._shown = state
        c = theme.colours()
        self.server = server
        self.setRect(rect)
        fill = QColor(state_colour(server["state"]))
        fill.setAlphaF(0.85 if server["state"] == "ONLINE" else 0.55)
        self.setBrush(QBrush(fill))
        pen = QPen(
            QColor(c.accent if server.get("this_computer") else c.text), 2.5 if server.get("this_computer") else 1
        )
        if server.get("using_relay"):
            pen.setStyle(Qt.PenStyle.DashLine)
        if self.pinned:
            pen = QPen(QColor(c.accent), 3)
        self.setPen(pen)
        self.setToolTip(server_details(server))
        text = server_label(server) + ("  ⇄ relay" if server.get("using_relay") else "")
        self.label.setFont(font)
        self.label.setBrush(QColor("#101012"))
        metrics_w = rect.width() - 8
        shown = (
            text
            if len(text) * font.pointSizeF() * 0.62 < metrics_w
            else server_label(server)[: max(int(metrics_w / 6), 0)]
        )
        self.label.setText(shown)
        self.label.setPos(rect.left() + 4, rect.top() + (rect.height() - self.label.boundingRect().height()) / 2)


class SwarmGraph(QGraphicsView):
    server_clicked = Signal(dict)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.scene_ = QGraphicsScene(self)
        self.setScene(self.scene_)
        self.setRenderHint(QPainter.RenderHint.Antialiasing)
        self.setViewportUpdateMode(QGraphicsView.ViewportUpdateMode.MinimalViewportUpdate)
        self.setDragMode(QGraphicsView.DragMode.ScrollHandDrag)
        self.setTransformationAnchor(QGraphicsView.ViewportAnchor.AnchorUnderMouse)
        self.setAccessibleName("Swarm map")
        self.items_by_peer: dict[str, ServerItem] = {}
        self.edges: list[QGraphicsPathItem] = []
        self.axis: list[QGraphicsItem] = []
        self.client_node = QGraphicsEllipseItem(-24, -24, 48, 48)
        self.client_node.setToolTip("This computer's chat client: the route starts here")
        self.client_label = QGraphicsSimpleTextItem("this computer\n(chat client)")
        self.scene_.addItem(self.client_node)
        self.scene_.addItem(self.client_label)
        self.model: dict | None = None
        self.pinned: str | None = None
        self._pending: list = []
        self._slicer = QTimer(self)
        self._slicer.setInterval(1)
        self._slicer.timeout.connect(self._apply_slice)
        self._fitted = False
        self.font_ = QFont(self.font())
        self.font_.setPointSizeF(8.5)

    # --- data ---------------------------------------------------------------------------------------
    def set_model(self, model: dict | None) -> None:
        self.model = model
        c = theme.colours()
        self.setBackgroundBrush(QColor(c.base))
        if not model:
            for item in self.items_by_peer.values():
                self.scene_.removeItem(item)
            self.items_by_peer.clear()
            self._draw_edges([])
            return
        servers = model["servers"]
        blocks = max(model["num_blocks"], 1)
        cell = SCENE_W / blocks
        lanes = assign_lanes(servers)
        lane_count = max(lanes.values(), default=-1) + 1
        seen = {s["peer_id"] for s in servers}
        for peer in list(self.items_by_peer):
            if peer not in seen:
                self.scene_.removeItem(self.items_by_peer.pop(peer))
        work = []
        for s in servers:
            lane = lanes[s["peer_id"]]
            rect = QRectF(
                s["start_block"] * cell + 1, TOP + lane * LANE_H, (s["end_block"] - s["start_block"]) * cell - 2, BOX_H
            )
            work.append((s, rect))
        # Items are updated in slices between event-loop turns, so a swarm of hundreds of changed
        # servers never holds the UI thread for long; a newer model replaces the pending slices.
        self._pending = work
        self._apply_slice()
        if self._pending:
            self._slicer.start()
        middle = TOP + max(lane_count, 1) * LANE_H / 2
        self.client_node.setRect(CLIENT_X - 24, middle - 24, 48, 48)
        self.client_node.setBrush(QColor(c.accent))
        self.client_node.setPen(QPen(QColor(c.text), 1))
        self.client_label.setBrush(QColor(c.text))
        self.client_label.setFont(self.font_)
        self.client_label.setPos(CLIENT_X - 40, middle + 28)
        self._draw_axis(blocks, cell, lane_count)
        if not self._pending:
            self._draw_edges(model.get("route") or [])
        self.scene_.setSceneRect(
            QRectF(CLIENT_X - 60, 0, SCENE_W - CLIENT_X + 80, TOP + max(lane_count, 2) * LANE_H + 30)
        )
        if not self._fitted and self.isVisible():
            self.fit()

    def _draw_axis(self, blocks: int, cell: float, lanes: int) -> None:
        c = theme.colours()
        for item in self.axis:
            self.scene_.removeItem(item)
        self.axis = []
        step = max(1, round(blocks / 12))
        pen = QPen(QColor(c.border), 1, Qt.PenStyle.DotLine)
        for block in [*range(0, blocks, step), blocks]:
            x = block * cell
            line = self.scene_.addLine(x, TOP - 6, x, TOP + max(lanes, 1) * LANE_H, pen)
            label = self.scene_.addSimpleText(str(block), self.font_)
            label.setBrush(QColor(c.muted))
            label.setPos(x - label.boundingRect().width() / 2, 4)
            line.setZValue(-1)
            self.axis += [line, label]
        title = self.scene_.addSimpleText("blocks →", self.font_)
        title.setBrush(QColor(c.muted))
        title.setPos(CLIENT_X - 40, 4)
        self.axis.append(title)

    def _draw_edges(self, route: list[dict]) -> None:
        for edge in self.edges:
            self.scene_.removeItem(edge)
        self.edges = []
        previous = self.client_node.rect().center() + QPointF(24, 0)
        for segment in route:
            item = self.items_by_peer.get(segment["peer_id"])
            if item is None:
                continue
            rect = item.rect()
            target = QPointF(rect.left(), rect.center().y())
            path = QPainterPath(previous)
            dx = max((target.x() - previous.x()) / 2, 20)
            path.cubicTo(previous + QPointF(dx, 0), target - QPointF(dx, 0), target)
            edge = QGraphicsPathItem(path)
            ping = item.server.get("ping_ms")
            edge.setPen(QPen(QColor(latency_colour(ping)), 3, Qt.PenStyle.SolidLine, Qt.PenCapStyle.RoundCap))
            edge.setZValue(2)
            edge.setToolTip(
                f"route: blocks {segment['start']}:{segment['end']} via {server_label(item.server)}, "
                f"ping {'–' if ping is None else f'{ping:.0f} ms'}"
            )
            self.scene_.addItem(edge)
            self.edges.append(edge)
            previous = QPointF(rect.right(), rect.center().y())

    def _apply_slice(self) -> None:
        start = time.perf_counter()
        while self._pending and time.perf_counter() - start < SLICE_S:
            s, rect = self._pending.pop(0)
            item = self.items_by_peer.get(s["peer_id"])
            if item is None:
                item = ServerItem(s["peer_id"])
                self.scene_.addItem(item)
                self.items_by_peer[s["peer_id"]] = item
            item.pinned = s["peer_id"] == self.pinned
            item.update_from(s, rect, self.font_)
        if not self._pending:
            self._slicer.stop()
            self._draw_edges((self.model or {}).get("route") or [])

    # --- interaction --------------------------------------------------------------------------------
    def fit(self) -> None:
        self.fitInView(self.scene_.sceneRect(), Qt.AspectRatioMode.KeepAspectRatio)
        # Never shrink text below legibility: with many lanes, scroll instead.
        if self.transform().m11() < 0.8:
            self.resetTransform()
            self.scale(0.8, 0.8)
        self._fitted = True

    def showEvent(self, event) -> None:
        super().showEvent(event)
        if not self._fitted and self.model:
            self.fit()

    def wheelEvent(self, event) -> None:
        if event.modifiers() & Qt.KeyboardModifier.ControlModifier:
            factor = 1.15 if event.angleDelta().y() > 0 else 1 / 1.15
            self.scale(factor, factor)
            return
        super().wheelEvent(event)

    def mousePressEvent(self, event) -> None:
        item = self.itemAt(event.position().toPoint())
        while item is not None and not isinstance(item, ServerItem):
            item = item.parentItem()
        if isinstance(item, ServerItem):
            self.pin(item.peer_id)
        super().mousePressEvent(event)

    def pin(self, peer_id: str | None) -> None:
        self.pinned = peer_id
        for peer, item in self.items_by_peer.items():
            item.pinned = peer == peer_id
            item.update_from(item.server, item.rect(), self.font_)
        if peer_id in self.items_by_peer:
            self.server_clicked.emit(self.items_by_peer[peer_id].server)
