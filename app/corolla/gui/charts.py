"""Contribution charts (pyqtgraph: axes with units, hover values, zoom). pyqtgraph is imported only
when the Stats pane is first shown, so it never slows the window's first paint."""

from __future__ import annotations

import time

import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtGui import QColor
from PySide6.QtWidgets import QWidget

from corolla.gui import theme


class HourlyChart(pg.PlotWidget):
    """Bars per time slot with a date axis, a unit on the value axis and the value under the mouse."""

    def __init__(self, title: str, unit: str, integer: bool = False, parent: QWidget | None = None):
        super().__init__(parent=parent, axisItems={"bottom": pg.DateAxisItem(orientation="bottom")})
        self.unit, self.integer, self.chart_title = unit, integer, title
        c = theme.colours()
        self.restyle()
        self.getAxis("left").enableAutoSIPrefix(False)  # "minutes", never "minutes (x0.001)"
        self.showGrid(x=False, y=True, alpha=0.25)
        self.setMouseEnabled(x=False, y=False)
        self.hideButtons()
        self.setMenuEnabled(False)
        self.bars: pg.BarGraphItem | None = None
        self.slots: list[tuple[float, float]] = []
        self.slot_seconds = 3600.0
        self.hover = pg.TextItem(color=c.text, anchor=(0.5, 1.0), fill=QColor(c.assistant_bubble))
        self.hover.setZValue(10)
        self.hover.hide()
        self.addItem(self.hover)
        # An empty period says so, over an axis that still reads (0 to 5), not a blank box.
        self.empty = pg.TextItem("Nothing in this period yet", color=c.muted, anchor=(0.5, 0.5))
        self.empty.hide()
        self.addItem(self.empty)
        self.scene().sigMouseMoved.connect(self._mouse_moved)
        self.setAccessibleName(title)

    def restyle(self) -> None:
        """The theme's colours (again, after a switch between light and dark)."""
        c = theme.colours()
        self.setBackground(QColor(c.base))
        self.setTitle(self.chart_title, color=c.text, size="10pt")
        self.setLabel("left", self.unit, color=c.muted)
        for axis in ("left", "bottom"):
            self.getAxis(axis).setPen(QColor(c.muted))
            self.getAxis(axis).setTextPen(QColor(c.muted))
        if getattr(self, "hover", None) is not None:
            self.hover.setColor(QColor(c.text))
            self.hover.fill = pg.mkBrush(QColor(c.assistant_bubble))
            self.empty.setColor(QColor(c.muted))

    def set_series(self, starts: list[float], values: list[float], slot_seconds: float, colour: str) -> None:
        self.slots, self.slot_seconds = list(zip(starts, values, strict=True)), slot_seconds
        if self.bars is not None:
            self.removeItem(self.bars)
        self.bars = pg.BarGraphItem(
            x=[s + slot_seconds / 2 for s in starts],
            height=values,
            width=slot_seconds * 0.8,
            brush=QColor(colour),
            pen=None,
        )
        self.addItem(self.bars)
        top = max(values, default=0)
        self.setYRange(0, top * 1.15 if top > 0 else 5, padding=0)
        self.empty.setVisible(top <= 0 and bool(starts))
        if starts:
            self.empty.setPos((starts[0] + starts[-1] + slot_seconds) / 2, 2.5)
        if self.integer and top < 10:  # counts: whole-number ticks only
            self.getAxis("left").setTickSpacing(major=1, minor=1)
        else:
            self.getAxis("left").setTickSpacing()
        if starts:
            self.setXRange(starts[0], starts[-1] + slot_seconds, padding=0.01)

    def value_at(self, x: float) -> tuple[float, float] | None:
        for start, value in self.slots:
            if start <= x < start + self.slot_seconds:
                return start, value
        return None

    def _mouse_moved(self, position) -> None:
        if not self.sceneBoundingRect().contains(position):
            self.hover.hide()
            return
        point = self.getPlotItem().vb.mapSceneToView(position)
        hit = self.value_at(point.x())
        if hit is None:
            self.hover.hide()
            return
        start, value = hit
        fmt = "%d %b %H:00" if self.slot_seconds < 86400 else "%a %d %b"
        shown = f"{value:,.1f}" if value % 1 else f"{int(value):,}"
        self.hover.setText(f"{time.strftime(fmt, time.localtime(start))}: {shown} {self.unit}")
        self.hover.setPos(start + self.slot_seconds / 2, value)
        self.hover.show()


def make_chart(title: str, unit: str, integer: bool = False) -> HourlyChart:
    chart = HourlyChart(title, unit, integer)
    chart.setMinimumHeight(150)
    chart.setFocusPolicy(Qt.FocusPolicy.NoFocus)
    return chart
