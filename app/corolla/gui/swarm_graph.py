"""The swarm map: a QGraphicsView with this computer, every server laid out by the blocks it serves
(one lane per overlap), and the current route as edges coloured by latency.

All servers are painted by one item (`ServerLayer`) from a plain list of boxes, not one QGraphicsItem
each: a refresh of 200 servers is then a little Python arithmetic and one repaint of what is on screen,
where updating 200 items (pens, brushes, text layout, the scene's index) held the UI thread 65–150 ms.
Labels are cached as QStaticText, so an unchanged label is never laid out again. Updates keep zoom and
scroll; 200 servers stay readable (lanes, a minimum zoom, scrolling)."""

from __future__ import annotations

from dataclasses import dataclass

from PySide6.QtCore import QPointF, QRectF, Qt, Signal
from PySide6.QtGui import QBrush, QColor, QFont, QFontMetricsF, QPainter, QPainterPath, QPen, QStaticText
from PySide6.QtWidgets import (
    QGraphicsEllipseItem,
    QGraphicsItem,
    QGraphicsPathItem,
    QGraphicsScene,
    QGraphicsSimpleTextItem,
    QGraphicsView,
    QStyleOptionGraphicsItem,
    QWidget,
)

from corolla.api.models import RouteHop, ServerSpeed, ServerVerification, SwarmModel, SwarmServer
from corolla.gui import theme
from corolla.gui.widgets import block_span

LANE_H = 30
BOX_H = 24
TOP = 34  # room for the block axis
CLIENT_X = -170
SCENE_W = 900.0
MIN_ZOOM = 0.8  # below this, text is no longer legible: the view scrolls instead
EVIDENCE_CHARS = 600  # the most of a flagged server's evidence a tooltip shows
SELECTED_LIGHT, SELECTED_DARK = "#2f6fe0", "#7fb2ff"  # the pinned server's outline (the palette's blue)


def latency_colour(ping_ms: float | None) -> str:
    c = theme.colours()
    if ping_ms is None:
        return c.muted
    return c.good if ping_ms < 50 else c.warn if ping_ms < 200 else c.bad


def state_colour(state: str) -> str:
    c = theme.colours()
    return {"ONLINE": c.good, "JOINING": c.warn}.get(state, "#8a8a90")


def assign_lanes(servers: list[SwarmServer]) -> dict[str, int]:
    """Interval partitioning: servers sorted by first block; each takes the first lane it fits in."""
    lanes_end: list[int] = []
    lanes: dict[str, int] = {}
    for s in sorted(servers, key=lambda s: (not s.this_computer, s.start_block, -s.end_block, s.peer_id)):
        for lane, end in enumerate(lanes_end):
            if end <= s.start_block:
                lanes_end[lane] = s.end_block
                lanes[s.peer_id] = lane
                break
        else:
            lanes_end.append(s.end_block)
            lanes[s.peer_id] = len(lanes_end) - 1
    return lanes


def verification(server: SwarmServer) -> ServerVerification | None:
    """The node's verdict on a server (spot checks), or None from a node that does not check servers."""
    v = server.verification
    return v if v is not None and v.state in ("verified", "unverified", "flagged") else None


def speed(server: SwarmServer) -> ServerSpeed | None:
    """The node's measure of a server's speed (slow | measured | unmeasured), or None from an older node."""
    v = server.speed
    return v if v is not None and v.state in ("slow", "measured", "unmeasured") else None


def slow_text(server: SwarmServer) -> str:
    """'slow (12x announced)' for a server this computer found slow, else ''."""
    v = speed(server)
    if v is None or v.state != "slow":
        return ""
    evidence = v.evidence or {}
    times = evidence.get("times_slower")
    stalled = str(evidence.get("kind", "")).startswith("stalled")
    what = "stalled" if stalled else "slow"
    return f"{what} ({times:.0f}x announced)" if isinstance(times, (int, float)) else what


def trust_text(server: SwarmServer) -> str:
    """A short verdict for the table: 'verified (3 checks)', 'not checked yet', 'FLAGGED', or '–', with
    'slow (12x announced)' after it for a server found slower than it announces."""
    text = _trust_text(server)
    slow = slow_text(server)
    return f"{text} · {slow}" if slow and text != "–" else (slow or text)


def _trust_text(server: SwarmServer) -> str:
    v = verification(server)
    if v is None:
        return "–"
    if server.this_computer:
        return "this computer (never checks itself)"
    checks = v.checks
    if v.state == "flagged":
        return "FLAGGED: wrong results"
    if v.state == "verified":
        return f"verified ({checks} check{'s' if checks != 1 else ''})"
    return "not checked yet" if not checks else f"unverified ({checks} check{'s' if checks != 1 else ''})"


def evidence_text(evidence: dict | None) -> str:
    """A flagged server's evidence as lines a person can read (bounded: it is shown in a tooltip)."""
    if not isinstance(evidence, dict) or not evidence:
        return ""
    names = {
        "blocks": "blocks",
        "step": "step",
        "max_error": "largest difference",
        "error": "difference",
        "tolerance": "tolerance",
        "compared_with": "honest servers that disagreed",
        "honest_peers": "honest servers that disagreed",
        "at": "when",
    }
    lines = []
    for key, value in list(evidence.items())[:12]:
        if isinstance(value, list):
            value = ", ".join(str(v) for v in value[:8]) + (" …" if len(value) > 8 else "")
        elif isinstance(value, float):
            value = f"{value:.4g}"
        lines.append(f"{names.get(key, str(key).replace('_', ' '))}: {value}")
    text = "\n".join(lines)
    return text if len(text) <= EVIDENCE_CHARS else text[:EVIDENCE_CHARS] + "…"


def server_label(s: SwarmServer) -> str:
    if s.this_computer:
        return "★ this computer"
    return s.public_name or "…" + s.peer_id[-6:]


def server_details(s: SwarmServer) -> str:
    software = f"corolla {s.corolla_version}" if s.corolla_version else f"petals {s.version}"
    ping = "–" if s.ping_ms is None else f"{s.ping_ms:.0f} ms"
    cache = "?" if s.cache_tokens_left is None else f"{s.cache_tokens_left:,} tokens"
    text = (
        f"{server_label(s)}  ({s.peer_id})\n"
        f"{s.state.lower()} · {block_span(s.start_block, s.end_block)} · {s.throughput:.1f} tokens/s\n"
        f"ping {ping} · {'relayed (no direct connection)' if s.using_relay else 'direct'} · {software}\n"
        f"{s.torch_dtype or '?'} {s.quant_type or ''} · free cache {cache}"
    )
    v = verification(s)
    if v is not None:
        if v.state == "flagged":
            text += "\n⚠ FLAGGED: this server returned wrong results; Corolla no longer routes through it."
            evidence = evidence_text(v.evidence)
            if evidence:
                text += "\nEvidence:\n" + evidence
        elif v.state == "verified":
            checks = v.checks
            spot_checks = f"{checks} spot check{'' if checks == 1 else 's'}"
            text += f"\n✓ Verified: its results matched other servers in {spot_checks}."
        else:
            text += "\nNot verified yet: no spot check has compared its results with another server."
    pace = speed(s)
    if pace is not None and pace.state == "slow":
        evidence = pace.evidence or {}
        detail = str(evidence.get("detail") or "")[:300]
        text += f"\n⏱ Slow: {detail or 'slower than it announces'}; Corolla routes around it when it can."
    elif pace is not None and pace.state == "measured" and pace.step_s is not None:
        text += f"\nSteps here take {pace.step_s * 1000:.0f} ms."
    return text


@dataclass
class ServerBox:
    """One server as the map draws it."""

    peer_id: str
    server: SwarmServer
    rect: QRectF
    label: QStaticText
    label_pos: QPointF
    flagged: bool = False
    verified: bool = False

    @property
    def looks(self) -> tuple:
        """Everything the map draws of this server: equal looks, no repaint."""
        s = self.server
        return (self.peer_id, self.rect.getRect(), self.label.text(), s.state, self.flagged, s.using_relay)


class ServerLayer(QGraphicsItem):
    """Every server's box and label, painted in one pass over the boxes on screen."""

    def __init__(self, font: QFont):
        super().__init__()
        self.font = font
        self.boxes: list[ServerBox] = []
        self.bounds = QRectF()
        self.pinned: str | None = None
        self.hovered: ServerBox | None = None
        self._looks: list[tuple] = []
        self.setAcceptHoverEvents(True)
        # Ask for the exposed rectangle, so a repaint draws only the boxes in it.
        self.setFlag(QGraphicsItem.GraphicsItemFlag.ItemUsesExtendedStyleOption, True)

    def set_boxes(self, boxes: list[ServerBox], bounds: QRectF) -> None:
        if bounds != self.bounds:
            self.prepareGeometryChange()
            self.bounds = bounds
        looks = [box.looks for box in boxes]
        changed = looks != self._looks
        self.boxes, self._looks = boxes, looks
        if self.hovered is not None:
            self.hovered = next((b for b in boxes if b.peer_id == self.hovered.peer_id), None)
            self.setToolTip(server_details(self.hovered.server) if self.hovered else "")
        if changed:  # pings and throughput change every refresh but are not drawn: no repaint for them
            self.update()

    def boundingRect(self) -> QRectF:
        return self.bounds

    def box_at(self, point: QPointF) -> ServerBox | None:
        return next((b for b in self.boxes if b.rect.contains(point)), None)

    def hoverMoveEvent(self, event) -> None:
        box = self.box_at(event.pos())
        if box is not self.hovered:
            self.hovered = box
            self.setToolTip(server_details(box.server) if box else "")  # built on hover, not per refresh
        super().hoverMoveEvent(event)

    def hoverLeaveEvent(self, event) -> None:
        self.hovered = None
        self.setToolTip("")
        super().hoverLeaveEvent(event)

    def paint(self, painter: QPainter, option: QStyleOptionGraphicsItem, widget: QWidget | None = None) -> None:
        c = theme.colours()
        exposed = option.exposedRect
        painter.setRenderHint(QPainter.RenderHint.Antialiasing, False)  # axis-aligned boxes need none
        painter.setFont(self.font)
        outline = QPen(QColor(c.text), 1)
        own = QPen(QColor(c.accent), 2.5)
        dashed = QPen(QColor(c.text), 1, Qt.PenStyle.DashLine)
        pinned = QPen(QColor(SELECTED_DARK if c.dark else SELECTED_LIGHT), 3.5)  # unlike any state colour
        pinned_relayed = QPen(pinned)  # pinning a relayed server keeps it drawn as relayed
        pinned_relayed.setStyle(Qt.PenStyle.DashLine)
        flagged = QPen(QColor(c.bad), 3)
        hatch = QBrush(QColor(c.bad), Qt.BrushStyle.BDiagPattern)
        label_pen = QPen(QColor("#101012"))
        fills: dict[tuple[str, bool], QBrush] = {}
        for box in self.boxes:
            if not box.rect.intersects(exposed):
                continue
            s = box.server
            key = (s.state, s.state == "ONLINE")
            if key not in fills:
                fill = QColor(state_colour(s.state))
                fill.setAlphaF(0.85 if key[1] else 0.55)
                fills[key] = QBrush(fill)
            if box.peer_id == self.pinned:
                pen = pinned_relayed if s.using_relay else pinned
            elif box.flagged:
                pen = flagged
            elif s.this_computer:
                pen = own
            elif s.using_relay:
                pen = dashed
            else:
                pen = outline
            painter.setPen(pen)
            painter.setBrush(fills[key])
            painter.drawRect(box.rect)
            if box.flagged:
                painter.fillRect(box.rect, hatch)
            painter.setPen(label_pen)
            painter.drawStaticText(box.label_pos, box.label)


class SwarmGraph(QGraphicsView):
    server_clicked = Signal(object)  # the SwarmServer clicked

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.scene_ = QGraphicsScene(self)
        # Few items, rebuilt or moved on every refresh: a spatial index would cost more than it saves.
        self.scene_.setItemIndexMethod(QGraphicsScene.ItemIndexMethod.NoIndex)
        self.setScene(self.scene_)
        self.setRenderHint(QPainter.RenderHint.Antialiasing)
        self.setViewportUpdateMode(QGraphicsView.ViewportUpdateMode.MinimalViewportUpdate)
        self.setDragMode(QGraphicsView.DragMode.ScrollHandDrag)
        self.setTransformationAnchor(QGraphicsView.ViewportAnchor.AnchorUnderMouse)
        self.setAccessibleName("Swarm map")
        self.setAccessibleDescription("Servers by the blocks they serve; the route from this computer as lines")
        self.font_ = QFont(self.font())
        self.font_.setPointSizeF(8.5)
        self.metrics = QFontMetricsF(self.font_)
        self.layer = ServerLayer(self.font_)
        self.scene_.addItem(self.layer)
        self.boxes_by_peer: dict[str, ServerBox] = {}
        self.edges: list[QGraphicsPathItem] = []
        self._edges_key: tuple | None = None
        self.axis: list[QGraphicsItem] = []
        self._axis_key: tuple | None = None
        self._labels: dict[tuple[str, int], tuple[QStaticText, float]] = {}  # (text, width) -> laid-out label
        self.client_node = QGraphicsEllipseItem(-24, -24, 48, 48)
        self.client_node.setToolTip("This computer's chat client: the route starts here")
        self.client_label = QGraphicsSimpleTextItem("this computer\n(chat client)")
        self.scene_.addItem(self.client_node)
        self.scene_.addItem(self.client_label)
        self.model: SwarmModel | None = None
        self.pinned: str | None = None
        self.cell = SCENE_W
        self._fitted = False

    # --- data ---------------------------------------------------------------------------------------
    def _label(self, text: str, width: float) -> tuple[QStaticText, float]:
        """The label fitted to its box (elided), laid out once and reused while text and width hold."""
        key = (text, int(width))
        cached = self._labels.get(key)
        if cached is None:
            if len(self._labels) > 4000:  # servers come and go: never grow without bound
                self._labels.clear()
            shown = self.metrics.elidedText(text, Qt.TextElideMode.ElideRight, max(width, 0))
            label = QStaticText(shown)
            label.setTextFormat(Qt.TextFormat.PlainText)  # peer names are data, never markup
            label.prepare(font=self.font_)
            cached = self._labels[key] = (label, self.metrics.height())
        return cached

    def set_model(self, model: SwarmModel | None) -> None:
        self.model = model
        c = theme.colours()
        self.setBackgroundBrush(QColor(c.base))
        if not model:
            self.boxes_by_peer = {}
            self.layer.set_boxes([], QRectF())
            self._draw_edges([])
            return
        servers = model.servers
        blocks = max(model.num_blocks, 1)
        cell = self.cell = SCENE_W / blocks
        lanes = assign_lanes(servers)
        lane_count = max(lanes.values(), default=-1) + 1
        boxes = []
        for s in servers:
            lane = lanes[s.peer_id]
            rect = QRectF(
                s.start_block * cell + 1, TOP + lane * LANE_H, (s.end_block - s.start_block) * cell - 2, BOX_H
            )
            v = verification(s)
            flagged = v is not None and v.state == "flagged"
            verified = v is not None and v.state == "verified"
            text = ("⚠ " if flagged else "✓ " if verified else "") + server_label(s)
            if s.using_relay:
                text += "  ⇄ relay"
            label, height = self._label(text, rect.width() - 8)
            position = QPointF(rect.left() + 4, rect.top() + (rect.height() - height) / 2)
            boxes.append(ServerBox(s.peer_id, s, rect, label, position, flagged, verified))
        self.boxes_by_peer = {b.peer_id: b for b in boxes}
        self.layer.pinned = self.pinned
        bounds = QRectF(0, TOP, SCENE_W, max(lane_count, 1) * LANE_H).adjusted(-2, -2, 2, 2)
        self.layer.set_boxes(boxes, bounds)
        middle = TOP + max(lane_count, 1) * LANE_H / 2
        self.client_node.setRect(CLIENT_X - 24, middle - 24, 48, 48)
        self.client_node.setBrush(QColor(c.accent))
        self.client_node.setPen(QPen(QColor(c.text), 1))
        self.client_label.setBrush(QColor(c.text))
        self.client_label.setFont(self.font_)
        self.client_label.setPos(CLIENT_X - 40, middle + 28)
        self._draw_axis(blocks, cell, lane_count)
        self._draw_edges(model.route)
        self.scene_.setSceneRect(
            QRectF(CLIENT_X - 60, 0, SCENE_W - CLIENT_X + 80, TOP + max(lane_count, 2) * LANE_H + 30)
        )
        if not self._fitted and self.isVisible():
            self.fit()

    def _draw_axis(self, blocks: int, cell: float, lanes: int) -> None:
        key = (blocks, lanes, theme.is_dark())
        if key == self._axis_key:
            return  # the same axis: nothing to redraw
        self._axis_key = key
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

    def _draw_edges(self, route: list[RouteHop]) -> None:
        segments = [(r, self.boxes_by_peer[r.peer_id]) for r in route if r.peer_id in self.boxes_by_peer]
        key = [(r.peer_id, r.start, r.end, box.rect.getRect(), latency_colour(box.server.ping_ms))
               for r, box in segments]  # fmt: skip
        key.append((self.client_node.rect().getRect(), theme.is_dark()))
        rebuild = key != self._edges_key
        self._edges_key = key
        if rebuild:  # a new route, or one drawn differently; otherwise only the tooltips' numbers change
            for edge in self.edges:
                self.scene_.removeItem(edge)
            self.edges = []
        previous = self.client_node.rect().center() + QPointF(24, 0)
        for i, (segment, box) in enumerate(segments):
            rect = box.rect
            ping = box.server.ping_ms
            # The route enters and leaves a server where its span of blocks starts and ends (a server may
            # serve more blocks than the route takes from it).
            start_x = min(max(segment.start * self.cell, rect.left()), rect.right())
            end_x = min(max(segment.end * self.cell, rect.left()), rect.right())
            if rebuild:
                target = QPointF(start_x, rect.center().y())
                path = QPainterPath(previous)
                dx = max((target.x() - previous.x()) / 2, 20)
                path.cubicTo(previous + QPointF(dx, 0), target - QPointF(dx, 0), target)
                edge = QGraphicsPathItem(path)
                edge.setPen(QPen(QColor(latency_colour(ping)), 3, Qt.PenStyle.SolidLine, Qt.PenCapStyle.RoundCap))
                edge.setZValue(2)
                self.scene_.addItem(edge)
                self.edges.append(edge)
            self.edges[i].setToolTip(
                f"route: blocks {segment.start}:{segment.end} via {server_label(box.server)}, "
                f"ping {'–' if ping is None else f'{ping:.0f} ms'}"
            )
            previous = QPointF(end_x, rect.center().y())

    # --- interaction --------------------------------------------------------------------------------
    def fit(self) -> None:
        self.fitInView(self.scene_.sceneRect(), Qt.AspectRatioMode.KeepAspectRatio)
        # Never shrink text below legibility: with many lanes, scroll instead.
        if self.transform().m11() < MIN_ZOOM:
            self.resetTransform()
            self.scale(MIN_ZOOM, MIN_ZOOM)
        self._fitted = True

    def zoom(self, factor: float) -> None:
        self.scale(factor, factor)

    def showEvent(self, event) -> None:
        super().showEvent(event)
        if not self._fitted and self.model:
            self.fit()

    def wheelEvent(self, event) -> None:
        if event.modifiers() & Qt.KeyboardModifier.ControlModifier:
            self.zoom(1.15 if event.angleDelta().y() > 0 else 1 / 1.15)
            return
        super().wheelEvent(event)

    def mousePressEvent(self, event) -> None:
        box = self.layer.box_at(self.mapToScene(event.position().toPoint()))
        if box is not None:
            self.pin(box.peer_id)
        super().mousePressEvent(event)

    def pin(self, peer_id: str | None) -> None:
        self.pinned = peer_id
        self.layer.pinned = peer_id
        self.layer.update()
        if peer_id in self.boxes_by_peer:
            box = self.boxes_by_peer[peer_id]
            self.ensureVisible(box.rect, 20, 20)
            self.server_clicked.emit(box.server)
