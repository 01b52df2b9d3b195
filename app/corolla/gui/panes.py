"""The window's panes. Each takes the node client in its constructor and refreshes from the API."""

from __future__ import annotations

import time

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QMessageBox,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from corolla.gui.node_client import NodeClient
from corolla.gui.widgets import BarChart, CoverageMap
from corolla.units import human_bytes

PEER_COLUMNS = ["Server", "State", "Blocks", "Tokens/s", "Ping (ms)", "Software", "Link", "Free cache (tokens)"]
STATE_TEXT = {
    "online": "Contributing",
    "starting": "Starting…",
    "loading": "Loading the model…",
    "restarting": "Restarting after a crash",
    "paused": "Paused",
    "stopped": "Not contributing",
    "failed": "Failed",
}


class ContributePane(QWidget):
    def __init__(self, client: NodeClient, parent: QWidget | None = None):
        super().__init__(parent)
        self.client = client
        layout = QVBoxLayout(self)
        self.state = QLabel("Connecting to the node…")
        self.state.setObjectName("state")
        self.state.setStyleSheet("font-size: 18px; font-weight: 600")
        self.reason = QLabel("")
        self.reason.setWordWrap(True)
        layout.addWidget(self.state)
        layout.addWidget(self.reason)
        buttons = QHBoxLayout()
        self.start_button, self.pause_button = QPushButton("Start contributing"), QPushButton("Pause")
        self.resume_button, self.stop_button = QPushButton("Resume"), QPushButton("Stop")
        for button, action in (
            (self.start_button, "start"),
            (self.pause_button, "pause"),
            (self.resume_button, "resume"),
            (self.stop_button, "stop"),
        ):
            button.clicked.connect(lambda _=False, a=action: self.control(a))
            buttons.addWidget(button)
        layout.addLayout(buttons)
        live = QGroupBox("This computer's server")
        form = QFormLayout(live)
        self.fields = {
            name: QLabel("–")
            for name in ("blocks", "throughput", "cache", "tokens", "sessions", "uptime", "model", "failure")
        }
        for name, label in (
            ("model", "Model"),
            ("blocks", "Blocks served"),
            ("throughput", "Throughput"),
            ("cache", "Cache in use"),
            ("tokens", "Tokens served"),
            ("sessions", "Sessions"),
            ("uptime", "Uptime"),
            ("failure", "Last failure"),
        ):
            self.fields[name].setWordWrap(True)
            form.addRow(label, self.fields[name])
        layout.addWidget(live)
        hardware = QGroupBox("Hardware")
        self.hardware = QLabel("Detecting…")
        self.hardware.setWordWrap(True)
        QVBoxLayout(hardware).addWidget(self.hardware)
        layout.addWidget(hardware)
        layout.addStretch(1)
        self.last_status: dict | None = None

    def control(self, action: str) -> None:
        self.reason.setText(f"{action}…")
        self.client.call(
            "POST",
            f"/api/contribution/{action}",
            on_ok=lambda r: self.reason.setText(r["message"]),
            on_error=lambda e: self.reason.setText(f"Could not {action}: {e}"),
        )

    def show_status(self, status: dict) -> None:
        self.last_status = status
        c = status["contribution"]
        self.state.setText(STATE_TEXT.get(c["state"], c["state"]))
        self.reason.setText(c["reason"])
        running = c["state"] in ("online", "starting", "loading", "restarting")
        self.start_button.setEnabled(c["state"] in ("stopped", "failed"))
        self.pause_button.setEnabled(running)
        self.resume_button.setEnabled(c["state"] == "paused")
        self.stop_button.setEnabled(c["state"] != "stopped")
        blocks = f"{c['start_block']}:{c['end_block']}" if c.get("start_block") is not None else "–"
        used = c["cache_bytes_total"] - c["cache_bytes_left"]
        self.fields["model"].setText(status["model"])
        self.fields["blocks"].setText(blocks)
        self.fields["throughput"].setText(f"{c['throughput']:.1f} tokens/s" if c.get("throughput") else "–")
        self.fields["cache"].setText(f"{human_bytes(used)} of {human_bytes(c['cache_bytes_total'])}")
        self.fields["tokens"].setText(f"{c['tokens_served']:,}")
        self.fields["sessions"].setText(f"{c['sessions_active']} active, {c['sessions_opened']} served")
        self.fields["uptime"].setText(time.strftime("%H:%M:%S", time.gmtime(c.get("uptime_s") or 0)))
        self.fields["failure"].setText(c.get("last_failure") or "none")

    def show_hardware(self, report: dict) -> None:
        lines = [
            f"{a['name']} ({a['kind']}): {human_bytes(a['free_bytes'])} free of {human_bytes(a['total_bytes'])}"
            for a in report["accelerators"]
        ]
        plan = report.get("plan")
        if plan:
            lines.append(
                f"This model ({plan['family']}, {plan['dtype']}): "
                f"{human_bytes(plan['bytes_per_block'] + plan['cache_bytes_per_block'])} per block with its cache; "
                f"{plan['recommended_blocks']} of {plan['num_blocks']} blocks recommended"
            )
        self.hardware.setText("\n".join(lines))


class ChatPane(QWidget):
    reply_finished = Signal(dict)

    def __init__(self, client: NodeClient, parent: QWidget | None = None):
        super().__init__(parent)
        self.client = client
        self.chat_id: str | None = None
        self.stream = None
        self.reply_text = ""
        self.started = 0.0
        self.pieces = 0
        outer = QHBoxLayout(self)
        side = QVBoxLayout()
        self.chats = QListWidget()
        self.chats.currentItemChanged.connect(self._chat_selected)
        new_chat = QPushButton("New chat")
        new_chat.clicked.connect(self.new_chat)
        side.addWidget(new_chat)
        side.addWidget(self.chats)
        outer.addLayout(side, 1)
        main = QVBoxLayout()
        self.transcript = QTextBrowser()
        main.addWidget(self.transcript, 1)
        settings = QHBoxLayout()
        self.system = QLineEdit()
        self.system.setPlaceholderText("System prompt (for new chats)")
        self.temperature = QDoubleSpinBox()
        self.temperature.setRange(0.0, 2.0)
        self.temperature.setSingleStep(0.1)
        self.temperature.setPrefix("temperature ")
        self.top_p = QDoubleSpinBox()
        self.top_p.setRange(0.05, 1.0)
        self.top_p.setSingleStep(0.05)
        self.top_p.setValue(1.0)
        self.top_p.setPrefix("top-p ")
        self.max_tokens = QSpinBox()
        self.max_tokens.setRange(1, 2048)
        self.max_tokens.setValue(128)
        self.max_tokens.setPrefix("max tokens ")
        for widget in (self.system, self.temperature, self.top_p, self.max_tokens):
            settings.addWidget(widget)
        main.addLayout(settings)
        entry = QHBoxLayout()
        self.input = QPlainTextEdit()
        self.input.setPlaceholderText("Message")
        self.input.setMaximumHeight(80)
        self.send_button, self.stop_button = QPushButton("Send"), QPushButton("Stop")
        self.regenerate_button = QPushButton("Regenerate")
        self.stop_button.setEnabled(False)
        self.send_button.clicked.connect(self.send)
        self.stop_button.clicked.connect(self.stop)
        self.regenerate_button.clicked.connect(self.regenerate)
        entry.addWidget(self.input, 1)
        for button in (self.send_button, self.stop_button, self.regenerate_button):
            entry.addWidget(button)
        main.addLayout(entry)
        self.info = QLabel("")
        self.info.setWordWrap(True)
        main.addWidget(self.info)
        outer.addLayout(main, 3)
        self.messages: list[dict] = []

    def refresh_chats(self) -> None:
        self.client.call("GET", "/api/chats", on_ok=self._show_chats)

    def _show_chats(self, chats: list[dict]) -> None:
        current = self.chat_id
        self.chats.blockSignals(True)
        self.chats.clear()
        for chat in chats:
            item = QListWidgetItem(chat["title"])
            item.setData(Qt.ItemDataRole.UserRole, chat["id"])
            self.chats.addItem(item)
            if chat["id"] == current:
                self.chats.setCurrentItem(item)
        self.chats.blockSignals(False)

    def new_chat(self, then=None) -> None:
        def created(chat):
            self.chat_id = chat["id"]
            self.messages = []
            self._render()
            self.refresh_chats()
            if then:
                then()

        title = time.strftime("Chat %d %b %H:%M")
        self.client.call(
            "POST",
            "/api/chats",
            {"title": title, "system_prompt": self.system.text() or None},
            on_ok=created,
            on_error=lambda e: self.info.setText(f"Could not create a chat: {e}"),
        )

    def _chat_selected(self, item, _previous=None) -> None:
        if item is None or self.stream is not None:
            return
        self.chat_id = item.data(Qt.ItemDataRole.UserRole)
        self.client.call("GET", f"/api/chats/{self.chat_id}", on_ok=lambda c: self._load(c["messages"]))

    def _load(self, messages: list[dict]) -> None:
        self.messages = messages
        self._render()

    def _render(self) -> None:
        html = []
        for m in self.messages:
            who = "You" if m["role"] == "user" else "Assistant"
            note = {"interrupted": " (interrupted)", "stopped": " (stopped)", "failed": " (failed)"}.get(
                m["status"], ""
            )
            text = (m["content"] or "…").replace("&", "&amp;").replace("<", "&lt;").replace("\n", "<br>")
            html.append(f"<p><b>{who}{note}</b><br>{text}</p>")
        self.transcript.setHtml("".join(html))
        self.transcript.verticalScrollBar().setValue(self.transcript.verticalScrollBar().maximum())

    def _sampling(self) -> dict:
        return {
            "max_new_tokens": self.max_tokens.value(),
            "temperature": self.temperature.value(),
            "top_p": self.top_p.value(),
        }

    def _begin(self) -> None:
        self.send_button.setEnabled(False)
        self.regenerate_button.setEnabled(False)
        self.stop_button.setEnabled(True)
        self.reply_text, self.pieces, self.started = "", 0, time.perf_counter()
        self.info.setText("Waiting for the swarm…")

    def regenerate(self) -> None:
        """Answer the last message again (sampled unless the temperature is 0)."""
        if self.chat_id is None or self.stream is not None or not any(m["role"] == "user" for m in self.messages):
            return
        while self.messages and self.messages[-1]["role"] != "user":
            self.messages.pop()
        self._begin()
        self._render()
        self.stream = self.client.stream(
            f"/api/chats/{self.chat_id}/regenerate", self._sampling(), self._on_event, self._on_error
        )

    def send(self) -> None:
        text = self.input.toPlainText().strip()
        if not text or self.stream is not None:
            return
        if self.chat_id is None:
            self.new_chat(then=self.send)
            return
        self.input.clear()
        self._begin()
        body = {"content": text, **self._sampling()}
        self.stream = self.client.stream(f"/api/chats/{self.chat_id}/messages", body, self._on_event, self._on_error)

    def stop(self) -> None:
        if self.stream is not None:
            self.stream.abort()
            self._finish("stopped")

    def _on_event(self, kind: str, data: dict) -> None:
        if kind == "message":
            self.messages.append(data["message"])
        elif kind == "token":
            self.reply_text += data["text"]
            self.pieces += 1
            self.messages[-1]["content"] = self.reply_text
            rate = self.pieces / max(time.perf_counter() - self.started, 1e-6)
            self.info.setText(f"{rate:.1f} tokens/s")
        elif kind == "done":
            self.messages[-1].update(content=data["text"], status=data["status"])
            self.info.setText(f"{data['tokens']} tokens, {data['tokens_per_second']:.1f} tokens/s")
            self._finish(data["status"])
            self.reply_finished.emit(data)
            return
        elif kind == "error":
            self.messages[-1]["status"] = "failed"
            what = (
                "Nobody serves this model yet. Start contributing on the Contribute tab, or join a swarm "
                "in the settings."
                if data.get("kind") == "no_swarm"
                else data["message"]
            )
            self.info.setText(what)
            self._finish("failed")
        self._render()

    def _on_error(self, message: str) -> None:
        self.info.setText(f"The reply stopped: {message}. Try again; what arrived is kept.")
        self._finish("failed")

    def _finish(self, status: str) -> None:
        self.stream = None
        self.send_button.setEnabled(True)
        self.regenerate_button.setEnabled(True)
        self.stop_button.setEnabled(False)
        self._render()


class SwarmPane(QWidget):
    def __init__(self, client: NodeClient, parent: QWidget | None = None):
        super().__init__(parent)
        self.client = client
        layout = QVBoxLayout(self)
        self.summary = QLabel("Reading the swarm…")
        self.summary.setWordWrap(True)
        self.map = CoverageMap()
        self.details = QLabel("Hover over or click a server for details.")
        self.details.setWordWrap(True)
        self.map.server_clicked.connect(self._show_server)
        self.peers = QTableWidget(0, len(PEER_COLUMNS))
        self.peers.setHorizontalHeaderLabels(PEER_COLUMNS)
        self.peers.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.peers.horizontalHeader().setStretchLastSection(True)
        layout.addWidget(self.summary)
        layout.addWidget(self.map, 1)
        layout.addWidget(self.peers, 1)
        layout.addWidget(self.details)
        self.models: list[dict] = []

    def show_swarm(self, models: list[dict]) -> None:
        self.models = models
        if not models:
            self.summary.setText("No model is announced in this swarm yet.")
            self.map.set_model(None)
            return
        model = models[0]
        missing = model["missing_blocks"]
        state = "healthy" if model["healthy"] else f"missing blocks {missing[:10]}"
        self.summary.setText(
            f"{model['dht_prefix']}: {model['num_blocks']} blocks, {len(model['servers'])} server(s), {state}"
        )
        self.map.set_model(model)
        self.peers.setRowCount(len(model["servers"]))
        for row, s in enumerate(model["servers"]):
            free = (
                s["cache_tokens_left"] // max(2 * (s["end_block"] - s["start_block"]), 1)
                if s.get("cache_tokens_left") is not None
                else None
            )
            software = f"corolla {s['corolla_version']}" if s.get("corolla_version") else f"petals {s.get('version')}"
            cells = [
                "★ this computer" if s.get("this_computer") else "…" + s["peer_id"][-10:],
                s["state"],
                f"{s['start_block']}:{s['end_block']}",
                f"{s['throughput']:.1f}",
                "-" if s.get("ping_ms") is None else f"{s['ping_ms']:.1f}",
                software,
                "relay" if s.get("using_relay") else "direct",
                "?" if free is None else f"{free:,}",
            ]
            for column, text in enumerate(cells):
                self.peers.setItem(row, column, QTableWidgetItem(text))

    def show_error(self, message: str) -> None:
        self.summary.setText(f"The swarm cannot be read now: {message}")

    def _show_server(self, server: dict) -> None:
        self.details.setText(
            f"{server['peer_id']}: {server['state']}, blocks {server['start_block']}:"
            f"{server['end_block']}, {server['throughput']:.1f} tokens/s, ping {server.get('ping_ms')} ms"
        )


class StatsPane(QWidget):
    def __init__(self, client: NodeClient, parent: QWidget | None = None):
        super().__init__(parent)
        self.client = client
        layout = QVBoxLayout(self)
        self.total = QLabel("")
        self.tokens = BarChart("Tokens served per hour")
        self.sessions = BarChart("Inference sessions per hour")
        self.uptime = BarChart("Minutes online per hour")
        layout.addWidget(self.total)
        for chart in (self.tokens, self.sessions, self.uptime):
            layout.addWidget(chart, 1)
        self.history: list[dict] = []

    def show_history(self, rows: list[dict], hours: int = 24) -> None:
        """The last `hours` hours, one bar each (hours without contribution stay empty)."""
        self.history = rows
        by_hour = {r["hour"]: r for r in rows}
        now = int(time.time() // 3600)
        slots = [
            by_hour.get(h, {"tokens_served": 0, "sessions": 0, "uptime_s": 0.0})
            for h in range(now - hours + 1, now + 1)
        ]
        labels = [time.strftime("%d %b %H:00", time.localtime(h * 3600)) for h in range(now - hours + 1, now + 1)]
        self.tokens.set_values([s["tokens_served"] for s in slots], labels)
        self.sessions.set_values([s["sessions"] for s in slots], labels)
        self.uptime.set_values([round(s["uptime_s"] / 60, 1) for s in slots], labels)
        total = sum(r["tokens_served"] for r in rows)
        online = sum(r["uptime_s"] for r in rows) / 3600
        self.total.setText(f"{total:,} tokens served and {online:.1f} hours online in the last {hours} hours")


def explain(parent: QWidget, title: str, message: str) -> None:
    QMessageBox.warning(parent, title, message)
