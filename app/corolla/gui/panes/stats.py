"""Stats: what this computer served over 24 hours, 7 days or 30 days (tokens, sessions, time online),
and its lifetime totals. The charts (pyqtgraph) are built the first time the pane is shown."""

from __future__ import annotations

import time

from PySide6.QtCore import QSettings
from PySide6.QtWidgets import QButtonGroup, QHBoxLayout, QPushButton, QVBoxLayout, QWidget

from corolla.api import routes
from corolla.api.models import HourStats, Lifetime
from corolla.gui import theme
from corolla.gui.node_client import NodeClient
from corolla.gui.panes.contribute_text import duration
from corolla.gui.widgets import plain_label, plural

RANGES = {"24h": (24, 3600), "7d": (24 * 7, 6 * 3600), "30d": (24 * 30, 86400)}  # hours shown, slot length


def bucket(rows: list[HourStats], hours: int, slot_s: int, now: float | None = None) -> list[dict]:
    """Hourly rows -> one entry per slot (oldest first), empty slots included. Daily slots follow the
    local calendar day; shorter ones the clock."""
    now = time.time() if now is None else now
    if slot_s >= 86400:
        today = time.mktime((*time.localtime(now)[:3], 0, 0, 0, 0, 0, -1))
        starts = [today - 86400 * i for i in range(hours // 24 - 1, -1, -1)]
    else:
        last = now // slot_s * slot_s
        starts = [last - slot_s * i for i in range(hours * 3600 // slot_s - 1, -1, -1)]
    slots = [{"start": s, "tokens_served": 0, "sessions": 0, "uptime_s": 0.0} for s in starts]
    length = 86400 if slot_s >= 86400 else slot_s
    for row in rows:
        t = row.hour * 3600
        slot = next((s for s in reversed(slots) if t >= s["start"]), None)
        if slot is not None and t < slot["start"] + length:
            for key in ("tokens_served", "sessions", "uptime_s"):
                slot[key] += getattr(row, key)
    return slots


class StatsPane(QWidget):
    def __init__(self, client: NodeClient, prefs: QSettings, parent: QWidget | None = None):
        super().__init__(parent)
        self.client, self.prefs = client, prefs
        layout = QVBoxLayout(self)
        layout.setContentsMargins(14, 10, 14, 10)
        self.lifetime = plain_label("")
        self.lifetime.setStyleSheet("font-size: 15px; font-weight: 600")
        self.lifetime.setWordWrap(True)
        layout.addWidget(self.lifetime)
        row = QHBoxLayout()
        self.range_group = QButtonGroup(self)
        self.range_buttons: dict[str, QPushButton] = {}
        for key, text in (("24h", "24 hours"), ("7d", "7 days"), ("30d", "30 days")):
            button = QPushButton("&" + text)  # Alt+2, Alt+7, Alt+3
            button.setCheckable(True)
            button.setAccessibleName(f"Show the last {text}")
            button.clicked.connect(lambda _=False, k=key: self.set_range(k))
            self.range_group.addButton(button)
            self.range_buttons[key] = button
            row.addWidget(button)
        self.total = plain_label("")
        self.total.setWordWrap(True)
        row.addWidget(self.total, 1)
        layout.addLayout(row)
        self.chart_area = QVBoxLayout()
        layout.addLayout(self.chart_area, 1)
        self.charts: dict | None = None
        self.history: list[HourStats] = []
        self.range = str(prefs.value("stats/range", "24h"))
        if self.range not in RANGES:
            self.range = "24h"
        self.range_buttons[self.range].setChecked(True)

    def focus_first(self) -> None:
        self.range_buttons[self.range].setFocus()

    @property
    def hours(self) -> int:
        return RANGES[self.range][0]

    def set_range(self, key: str) -> None:
        self.range = key
        self.range_buttons[key].setChecked(True)
        self.prefs.setValue("stats/range", key)
        self.refresh()

    def refresh(self) -> None:
        path = routes.stats_history(self.hours)
        self.client.call("GET", path, on_ok=self.show_history, answer=list[HourStats])

    def showEvent(self, event) -> None:
        super().showEvent(event)
        self._ensure_charts()
        self._draw()

    def _ensure_charts(self) -> None:
        if self.charts is not None:
            return
        from corolla.gui.charts import make_chart

        self.charts = {
            "tokens_served": make_chart("Tokens served", "tokens", integer=True),
            "sessions": make_chart("Inference sessions opened", "sessions", integer=True),
            "uptime_s": make_chart("Time online", "minutes"),
        }
        for chart in self.charts.values():
            self.chart_area.addWidget(chart, 1)

    def show_lifetime(self, life: Lifetime | None) -> None:
        since = life.since if life is not None else None
        if not since:
            self.lifetime.setText("This computer has not served the swarm yet.")
            return
        self.lifetime.setText(
            f"This computer has served {plural(life.tokens_served, 'token')} to "
            f"{plural(life.sessions, 'session')} "
            f"in {duration(life.uptime_s)} online since {time.strftime('%d %b %Y', time.localtime(since))}."
        )

    def show_history(self, rows: list[HourStats], hours: int | None = None) -> None:
        self.history = rows
        span = {24: "24 hours", 168: "7 days", 720: "30 days"}.get(self.hours, f"{self.hours} hours")
        tokens = sum(r.tokens_served for r in rows)
        sessions = sum(r.sessions for r in rows)
        online = sum(r.uptime_s for r in rows)
        self.total.setText(
            f"Last {span}: {plural(tokens, 'token')} served, {plural(sessions, 'session')}, {duration(online)} online"
        )
        self._draw()

    def restyle(self) -> None:
        for chart in (self.charts or {}).values():
            chart.restyle()
        self._draw()

    def _draw(self) -> None:
        if self.charts is None or not self.isVisible():
            return
        hours, slot_s = RANGES[self.range]
        slots = bucket(self.history, hours, slot_s)
        starts = [s["start"] for s in slots]
        c = theme.colours()
        length = 86400 if slot_s >= 86400 else slot_s
        minutes = slot_s < 86400 and hours <= 24
        self.charts["uptime_s"].unit = "minutes" if minutes else "hours"
        self.charts["uptime_s"].setLabel("left", self.charts["uptime_s"].unit)
        self.charts["tokens_served"].set_series(starts, [s["tokens_served"] for s in slots], length, c.accent)
        self.charts["sessions"].set_series(starts, [s["sessions"] for s in slots], length, "#3f7fd6")
        self.charts["uptime_s"].set_series(
            starts, [round(s["uptime_s"] / (60 if minutes else 3600), 2) for s in slots], length, c.good
        )
