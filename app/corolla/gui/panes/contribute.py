"""Contribute: what this computer gives the swarm — state, controls, the invite of a private swarm,
this run's and all-time counters, the last failure with its log, and the GPU / blocks choice."""

from __future__ import annotations

import itertools
import time

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import (
    QButtonGroup,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QFrame,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QRadioButton,
    QScrollArea,
    QSlider,
    QVBoxLayout,
    QWidget,
)

from corolla.api import models as m
from corolla.api import routes
from corolla.gui import theme
from corolla.gui.node_client import NodeClient
from corolla.gui.node_settings import NodeSettings
from corolla.gui.panes.contribute_text import ACTION_TEXT, STATE_TEXT, duration, model_text, network_text, together_text
from corolla.gui.widgets import plain_label, plural, sentence
from corolla.units import human_bytes


class ContributePane(QWidget):
    settings_changed = Signal()

    def __init__(self, client: NodeClient, parent: QWidget | None = None):
        super().__init__(parent)
        self.client = client
        self.last_status: m.NodeStatus | None = None
        self.hardware_report: m.HardwareReport | None = None
        scroll = QScrollArea(self)
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(scroll)
        body = QWidget()
        scroll.setWidget(body)
        layout = QVBoxLayout(body)
        layout.setContentsMargins(18, 14, 18, 14)

        self.state = plain_label("Connecting to the node…")
        self.state.setObjectName("state")
        self.state.setStyleSheet("font-size: 20px; font-weight: 600")
        self.reason = plain_label("")
        self.reason.setWordWrap(True)
        self.reason.setObjectName("muted")
        layout.addWidget(self.state)
        layout.addWidget(self.reason)

        self.rule_banner = plain_label("")  # paused by a rule: which, and until when
        self.rule_banner.setObjectName("banner")
        self.rule_banner.setWordWrap(True)
        self.rule_banner.hide()
        layout.addWidget(self.rule_banner)

        buttons = QHBoxLayout()
        self.start_button, self.pause_button = QPushButton("&Start contributing"), QPushButton("&Pause")
        self.resume_button, self.stop_button = QPushButton("&Resume"), QPushButton("S&top")
        self.free_button = QPushButton("Pause and free &memory")
        for button, action, tip in (
            (self.start_button, "start", "Serve blocks of the model for the swarm (Alt+S)"),
            (
                self.pause_button,
                "pause",
                "Stop serving for now; the model stays loaded, so Resume is back in a second (Ctrl+P)",
            ),
            (
                self.free_button,
                "pause-free",
                "Stop serving and unload the model: its memory is free; Resume loads it again",
            ),
            (self.resume_button, "resume", "Serve again (Ctrl+P)"),
            (self.stop_button, "stop", "Stop contributing until you start again (also after a restart)"),
        ):
            button.clicked.connect(lambda _=False, a=action: self.control(a))
            button.setAccessibleName(button.text().replace("&", ""))
            button.setToolTip(tip)
            buttons.addWidget(button)
        buttons.addStretch(1)
        layout.addLayout(buttons)

        self.invite_box = QGroupBox("Who can join this swarm")
        invite_layout = QVBoxLayout(self.invite_box)
        choice_row = QHBoxLayout()
        self.only_here = QRadioButton("This computer only")
        self.let_join = QRadioButton("Let others join")
        self.only_here.setAccessibleName("This computer only: nobody else can join")
        self.let_join.setAccessibleName("Let others join: other computers connect to this one")
        self.share_choice = QButtonGroup(self)
        for button in (self.only_here, self.let_join):
            self.share_choice.addButton(button)
            choice_row.addWidget(button)
            button.clicked.connect(lambda _=False: self._choose_sharing())
        choice_row.addStretch(1)
        self.choice_widgets = QWidget()
        self.choice_widgets.setLayout(choice_row)
        choice_row.setContentsMargins(0, 0, 0, 0)
        invite_layout.addWidget(self.choice_widgets)
        self.share_sentence = plain_label("")  # what the choice means, with the port
        self.share_sentence.setWordWrap(True)
        self.port_notice = plain_label("")  # the kept port was taken: the invite changed
        self.port_notice.setObjectName("banner")
        self.port_notice.setWordWrap(True)
        self.port_notice.hide()
        self.outside = plain_label("")  # whether people in other homes can reach this computer, and the fixes
        self.outside.setWordWrap(True)
        for label in (self.share_sentence, self.port_notice, self.outside):
            invite_layout.addWidget(label)
        invite_row = QHBoxLayout()
        self.invite = QLineEdit()
        self.invite.setReadOnly(True)
        self.invite.setAccessibleName("Invite string")
        self.copy_invite = QPushButton("C&opy invite")
        self.copy_invite.setAccessibleName("Copy the invite string")
        self.copy_invite.clicked.connect(self._copy_invite)
        invite_row.addWidget(self.invite, 1)
        invite_row.addWidget(self.copy_invite)
        invite_layout.addLayout(invite_row)
        self.invite_box.hide()
        layout.addWidget(self.invite_box)

        live = QGroupBox("This computer's server")
        grid = QGridLayout(live)
        self.fields: dict[str, QLabel] = {}
        for i, (name, label) in enumerate(
            (
                ("model", "Model"),
                ("blocks", "Blocks served"),
                ("throughput", "Throughput"),
                ("cache", "Cache in use"),
                ("tokens", "Tokens served"),
                ("sessions", "Chats served"),
                ("together", "Served together"),
                ("uptime", "Online"),
                ("lifetime", "All time"),
                ("network", "Network"),
            )
        ):
            caption = QLabel(label)
            caption.setObjectName("muted")
            value = plain_label("–")
            value.setWordWrap(True)
            value.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            caption.setBuddy(value)
            self.fields[name] = value
            grid.addWidget(caption, i // 2, (i % 2) * 2)
            grid.addWidget(value, i // 2, (i % 2) * 2 + 1)
        grid.setColumnStretch(1, 1)
        grid.setColumnStretch(3, 1)
        layout.addWidget(live)

        failure = QGroupBox("Last failure")
        failure_row = QHBoxLayout(failure)
        self.failure = plain_label("none")
        self.failure.setWordWrap(True)
        self.fields["failure"] = self.failure
        self.log_button = QPushButton("Show &log…")
        self.log_button.setAccessibleName("Show the block server's log")
        self.log_button.clicked.connect(self.show_log)
        failure_row.addWidget(self.failure, 1)
        failure_row.addWidget(self.log_button, 0, Qt.AlignmentFlag.AlignTop)
        layout.addWidget(failure)

        hardware = QGroupBox("Hardware and share")
        form = QFormLayout(hardware)
        self.hardware = plain_label("Detecting…")
        self.hardware.setWordWrap(True)
        form.addRow(self.hardware)
        self.device = QComboBox()
        self.device.setAccessibleName("Accelerator to contribute with")
        self.device.currentIndexChanged.connect(self._update_estimate)
        form.addRow("Accelerator", self.device)
        self.blocks = QSlider(Qt.Orientation.Horizontal)
        self.blocks.setAccessibleName("Blocks to serve")
        self.blocks.setRange(1, 1)
        self.blocks.valueChanged.connect(self._update_estimate)
        self.estimate = plain_label("")
        self.estimate.setWordWrap(True)
        form.addRow("Blocks", self.blocks)
        form.addRow("", self.estimate)
        self.apply_button = QPushButton("&Apply")
        self.apply_button.setAccessibleName("Apply the accelerator and block count")
        self.apply_button.clicked.connect(self.apply_share)
        self.apply_note = plain_label("")
        row = QHBoxLayout()
        row.addWidget(self.apply_button)
        row.addWidget(self.apply_note, 1)
        form.addRow("", row)
        layout.addWidget(hardware)
        layout.addStretch(1)
        chain = [
            self.start_button,
            self.pause_button,
            self.free_button,
            self.resume_button,
            self.stop_button,
            self.only_here,
            self.let_join,
            self.invite,
            self.copy_invite,
            self.log_button,
            self.device,
            self.blocks,
            self.apply_button,
        ]
        for first, second in itertools.pairwise(chain):
            self.setTabOrder(first, second)

    def focus_first(self) -> None:
        """The first control that can act now (disabled buttons take no focus)."""
        for button in (self.start_button, self.pause_button, self.resume_button, self.stop_button):
            if button.isEnabled():
                button.setFocus()
                return
        self.log_button.setFocus()

    # --- actions ------------------------------------------------------------------------------------
    def control(self, action: str) -> None:
        self.reason.setText(ACTION_TEXT.get(action, f"{action}…"))
        self.client.call(
            "POST",
            routes.contribution(action),
            on_ok=lambda r: self.reason.setText(sentence(r.message)),
            on_error=lambda e: self.reason.setText(sentence(f"Could not {action}: {e}")),
            answer=m.ActionResult,
        )

    def _choose_sharing(self) -> None:
        """This computer only / Let others join: the node restarts its server on the chosen interfaces."""
        others = self.let_join.isChecked()

        def switch(settings: NodeSettings) -> None:
            if settings.listen_on_lan == others:
                return
            self.client.call(
                "PUT",
                routes.SETTINGS,
                settings.with_changes(listen_on_lan=others),
                on_ok=lambda _: self.share_sentence.setText("Restarting the server for your choice…"),
                on_error=lambda e: self.share_sentence.setText(sentence(f"Could not change who can join: {e}")),
                answer=NodeSettings,
                request=NodeSettings,
            )

        self.client.call(
            "GET",
            routes.SETTINGS,
            on_ok=switch,
            on_error=lambda e: self.share_sentence.setText(sentence(e)),
            answer=NodeSettings,
        )

    def _copy_invite(self) -> None:
        QGuiApplication.clipboard().setText(self.invite.text())
        self.copy_invite.setText("Copied")

    def show_log(self) -> None:
        dialog = QDialog(self)
        dialog.setWindowTitle("Block server log")
        dialog.resize(820, 480)
        box = QVBoxLayout(dialog)
        text = QPlainTextEdit()
        text.setReadOnly(True)
        text.setAccessibleName("Log lines")
        text.setPlainText("Reading the log…")
        box.addWidget(text)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(dialog.reject)
        box.addWidget(buttons)

        def shown(reply: m.ServerLog) -> None:
            text.setPlainText(reply.log or "The block server has not written a log yet.")
            text.verticalScrollBar().setValue(text.verticalScrollBar().maximum())

        self.client.call(
            "GET",
            routes.contribution_log(400),
            on_ok=shown,
            on_error=lambda e: text.setPlainText(f"Not available: {e}"),
            answer=m.ServerLog,
        )
        self.log_dialog = dialog
        dialog.open()

    def apply_share(self) -> None:
        if self.last_status is None:
            return

        def got(settings: NodeSettings) -> None:
            share = {"device": self.device.currentData() or "auto", "num_blocks": self.blocks.value(), "blocks": None}
            self.client.call(
                "PUT",
                routes.SETTINGS,
                settings.with_changes(**share),
                on_ok=lambda _: (
                    self.apply_note.setText("Saved; the server restarts with the new share."),
                    self.settings_changed.emit(),
                ),
                on_error=lambda e: self.apply_note.setText(sentence(f"Not saved: {e}")),
                answer=NodeSettings,
                request=NodeSettings,
            )

        self.client.call(
            "GET",
            routes.SETTINGS,
            on_ok=got,
            on_error=lambda e: self.apply_note.setText(sentence(f"Not saved: {e}")),
            answer=NodeSettings,
        )

    # --- views --------------------------------------------------------------------------------------
    def _show_sharing(self, status: m.NodeStatus) -> None:
        """Who can join, what reaches whom (before the invite is shared), the fixes, and the invite."""
        sharing = status.sharing
        invite = status.invite
        self.invite_box.setVisible(bool(sharing) or bool(invite))
        if not sharing:  # the public swarm, or an older node: only its invite, if any
            self.choice_widgets.hide()
        else:
            self.choice_widgets.setVisible(status.swarm == "private")
            button = self.let_join if sharing.choice == "others" else self.only_here
            if not button.isChecked():
                button.setChecked(True)
            self.share_sentence.setText(sharing.sentence)
            self.port_notice.setVisible(bool(sharing.port_notice))
            self.port_notice.setText(sharing.port_notice or "")
            lines = [sharing.outside_sentence] if sharing.choice == "others" else []
            lines += [f"• {fix}" for fix in sharing.fixes]
            self.outside.setText("\n".join(lines))
            self.outside.setVisible(bool(lines))
        for widget in (self.invite, self.copy_invite):
            widget.setVisible(bool(invite))
        if invite and invite != self.invite.text():
            self.invite.setText(invite)
            self.invite.setCursorPosition(0)
            self.copy_invite.setText("C&opy invite")

    def show_unreachable(self) -> None:
        self.state.setText("The node does not answer")
        self.state.setStyleSheet(f"font-size: 20px; font-weight: 600; color: {theme.colours().bad}")
        self.reason.setText("Nothing is contributed while the node is stopped. Restart it from the banner above.")
        for button in (self.start_button, self.pause_button, self.free_button, self.resume_button, self.stop_button):
            button.setEnabled(False)
        self.rule_banner.hide()
        # What the node last said about its server is not true now: no invite, no live figures.
        self.invite_box.hide()
        for name in ("blocks", "throughput", "cache", "tokens", "sessions", "together", "uptime", "network"):
            self.fields[name].setText("–")
        self.last_status = None

    def show_status(self, status: m.NodeStatus) -> None:
        self.last_status = status
        c = status.contribution
        if status.awaiting_consent:
            self.state.setText("Waiting for your go-ahead")
            self.reason.setText("Nothing is served for the swarm until you agree in the welcome dialog or press Start.")
        else:
            self.state.setText(STATE_TEXT.get(c.state, c.state))
            self.reason.setText(sentence(c.reason))
        colours = theme.colours()
        colour = {
            "online": colours.good,
            "starting": colours.warn,
            "loading": colours.warn,
            "paused": colours.warn,
            "restarting": colours.bad,
            "failed": colours.bad,
        }.get(c.state, colours.muted)
        style = f"font-size: 20px; font-weight: 600; color: {colour}"
        if self.state.styleSheet() != style:  # a style sheet change re-styles and re-lays out: once a second is waste
            self.state.setStyleSheet(style)
        running = c.state in ("online", "starting", "loading", "restarting")
        self.start_button.setEnabled(c.state in ("stopped", "failed"))
        self.pause_button.setEnabled(running)
        self.free_button.setEnabled(running or c.model_kept)
        self.resume_button.setEnabled(c.state == "paused")
        self.stop_button.setEnabled(c.state != "stopped")
        rule = status.pause_rule
        self.rule_banner.setVisible(bool(rule))
        if rule:
            self.rule_banner.setText(f"Paused by your rule: {rule.message.removeprefix('paused: ')}, {rule.until}.")
        self._show_sharing(status)
        start, end = c.start_block, c.end_block
        blocks = f"{start}–{end - 1} ({plural(end - start, 'block')})" if start is not None and end else "–"
        used = c.cache_bytes_total - c.cache_bytes_left
        life = status.lifetime
        self.fields["model"].setText(model_text(status))
        self.fields["network"].setText(network_text(status.reachability))
        self.fields["blocks"].setText(blocks)
        self.fields["throughput"].setText(f"{c.throughput:.1f} tokens/s" if c.throughput else "–")
        self.fields["cache"].setText(f"{human_bytes(used)} of {human_bytes(c.cache_bytes_total)}")
        # This run's counters restart with the server; the all-time line comes from the node's records,
        # the same numbers the Stats pane charts.
        self.fields["tokens"].setText(f"{c.tokens_served:,} this run")
        self.fields["sessions"].setText(
            f"{c.sessions_active} now, at most {c.sessions_peak} at once, {c.sessions_opened} this run"
        )
        self.fields["together"].setText(together_text(c))
        self.fields["uptime"].setText(duration(c.uptime_s) + " this run" if running else "–")
        since = life.since
        self.fields["lifetime"].setText(
            f"{plural(life.tokens_served, 'token')}, {plural(life.sessions, 'session')}, "
            f"{duration(life.uptime_s)} online"
            + (time.strftime(" since %d %b %Y", time.localtime(since)) if since else "")
        )
        self.failure.setText(sentence(c.last_failure) if c.last_failure else "None.")

    def show_hardware(self, report: m.HardwareReport) -> None:
        self.hardware_report = report
        accelerators = report.accelerators
        lines = [
            f"{a.name} ({a.kind}): {human_bytes(a.free_bytes)} free of {human_bytes(a.total_bytes)}"
            for a in accelerators
        ]
        plan = report.plan
        if plan:
            lines.append(
                f"This model ({plan.family}, {plan.dtype}): "
                f"{human_bytes(plan.bytes_per_block + plan.cache_bytes_per_block)} per block with its cache; "
                f"{plan.recommended_blocks} of {plan.num_blocks} blocks recommended"
            )
        self.hardware.setText("\n".join(lines))
        current = self.device.currentData()
        self.device.blockSignals(True)
        self.device.clear()
        self.device.addItem("Automatic (the best one)", "auto")
        for a in accelerators:
            device = a.kind if a.index is None or a.kind != "cuda" else f"cuda:{a.index}"
            self.device.addItem(f"{a.name} — {human_bytes(a.free_bytes)} free", device)
        if current:
            self.device.setCurrentIndex(max(self.device.findData(current), 0))
        self.device.setEnabled(len(accelerators) > 1)
        self.device.blockSignals(False)
        if plan:
            self.blocks.setRange(1, max(plan.num_blocks, 1))
            if not self.blocks.property("touched"):
                self.blocks.setValue(max(plan.recommended_blocks, 1))
        self._update_estimate()

    def _update_estimate(self) -> None:
        report = self.hardware_report
        plan = report.plan if report is not None else None
        if not plan:
            self.estimate.setText("")
            return
        if self.sender() is self.blocks:
            self.blocks.setProperty("touched", True)
        device = self.device.currentData() or "auto"
        accelerators = report.accelerators
        chosen = next(
            (a for a in accelerators if device in (a.kind, f"{a.kind}:{a.index}")),
            next((a for a in accelerators if a.kind == "cuda"), accelerators[-1] if accelerators else None),
        )
        n = self.blocks.value()
        need = n * (plan.bytes_per_block + plan.cache_bytes_per_block)
        free = chosen.free_bytes if chosen else 0
        verdict = "fits" if need <= free * 0.8 else "more than 80 % of the free memory: the server may not start"
        self.estimate.setText(
            f"{n} of {plan.num_blocks} blocks: about {human_bytes(need)} with cache "
            f"of {human_bytes(free)} free — {verdict}"
        )
