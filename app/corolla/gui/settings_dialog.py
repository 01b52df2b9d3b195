"""Settings, also shown on first run: the swarm, the model (with its size and memory need), the Hugging
Face token, contribution limits, and start at login."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtGui import QIcon
from PySide6.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QRadioButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from corolla.api import routes
from corolla.api.models import PRIVACY_LABELS, PRIVACY_SENTENCES, ActionResult, HardwareReport, HfToken, Invite
from corolla.gui import autostart
from corolla.gui.node_client import NodeClient
from corolla.gui.node_settings import NodeSettings
from corolla.gui.settings_checks import friendly_error, local_problems
from corolla.gui.settings_sharing import SharingSettingsMixin
from corolla.gui.widgets import ScreenFittingScroll, plain_label, plural, sentence
from corolla.units import human_bytes

# What benchmarks/privacy.py and benchmarks/local_edges.py measured (README "Who can read my chat").
LOCAL_BLOCKS_SENTENCE = (
    "Runs the first and last blocks of the model here, so no server gets your words as such or the model's "
    "final output. It protects little: the first server can still read most of a chat back. Only the choice "
    "above keeps your text away from a server."
)


def privacy_picker() -> QComboBox:
    """The four privacy levels, each with its label (the level is the item's data)."""
    picker = QComboBox()
    for level, label in PRIVACY_LABELS.items():
        picker.addItem(label, level)
        picker.setItemData(picker.count() - 1, PRIVACY_SENTENCES[level], Qt.ItemDataRole.ToolTipRole)
    return picker


class SettingsDialog(SharingSettingsMixin, QDialog):
    def __init__(self, client: NodeClient, first_run: bool = False, parent: QWidget | None = None):
        super().__init__(parent)
        self.client = client
        self.first_run = first_run
        self.settings: NodeSettings | None = None
        self.setWindowTitle("Welcome to Corolla" if first_run else "Corolla settings")
        self.setMinimumWidth(620)
        outer = QVBoxLayout(self)
        form = QWidget()
        layout = QVBoxLayout(form)
        layout.setContentsMargins(0, 0, 0, 0)
        self.form_scroll = ScreenFittingScroll(form)
        outer.addWidget(self.form_scroll, 1)
        if first_run:
            intro = plain_label(
                "Corolla lets this computer serve part of a large language model to a swarm, and chat "
                "with the models the swarm serves. Choose where to start; everything can be changed later."
            )
            intro.setWordWrap(True)
            layout.addWidget(intro)

        swarm = QGroupBox("Swarm")
        swarm_layout = QVBoxLayout(swarm)
        self.private = QRadioButton("A private swarm on this computer (works offline; share it with an invite)")
        self.public = QRadioButton("The public Petals swarm")
        self.invite_option = QRadioButton("Join with an invite string")
        self.custom = QRadioButton("Custom peers (multiaddrs, one per line)")
        self.swarm_choice = QButtonGroup(self)
        for button in (self.private, self.public, self.invite_option, self.custom):
            self.swarm_choice.addButton(button)
            swarm_layout.addWidget(button)
            if button is self.private:
                swarm_layout.addWidget(self._sharing_section())
        self.invite = QLineEdit()
        self.invite.setPlaceholderText("corolla-invite:…")
        self.invite.setAccessibleName("Invite string")
        self.peers = QPlainTextEdit()
        self.peers.setAccessibleName("Custom peers, one multiaddr per line")
        self.peers.setPlaceholderText("/ip4/203.0.113.7/tcp/31337/p2p/Qm…")
        self.peers.setMinimumHeight(72)
        self.peers.setMaximumHeight(110)
        swarm_layout.addWidget(self.invite)
        swarm_layout.addWidget(self._lan_section())
        swarm_layout.addWidget(self.peers)
        self.lan_discovery = QCheckBox("Find swarms on this network, and announce my private swarm to it")
        self.lan_discovery.setAccessibleName("Swarms on this network: find and announce")
        self.lan_discovery.setToolTip(
            "Computers of this home or office running Corolla see each other's private swarms (mDNS). "
            "Off: nothing is announced and nothing listens. The public swarm is never announced."
        )
        self.lan_discovery.clicked.connect(self._lan_discovery_toggled)
        swarm_layout.addWidget(self.lan_discovery)
        self.swarm_choice.buttonToggled.connect(lambda *_: self._swarm_changed())
        layout.addWidget(swarm)

        model = QGroupBox("Model")
        form = QFormLayout(model)
        row = QHBoxLayout()
        self.model = QLineEdit()
        self.model.setPlaceholderText("Hugging Face id or a folder; empty: the built-in SmolLM2-135M-Instruct")
        check = QPushButton("Check")
        check.clicked.connect(self.check_model)
        row.addWidget(self.model, 1)
        row.addWidget(check)
        form.addRow("Model", row)
        self.dtype = QComboBox()
        self.dtype.addItems(["auto", "bfloat16", "float16", "float32"])
        self.quant = QComboBox()
        self.quant.addItems(["none", "int8", "nf4"])
        form.addRow("Precision", self.dtype)
        form.addRow("Quantization", self.quant)
        self.model_info = plain_label("")
        self.model_info.setWordWrap(True)
        self.model_info.hide()  # until Check says something: an empty row was a gap in the form
        form.addRow("", self.model_info)
        self.hf_token = QLineEdit()
        self.hf_token.setEchoMode(QLineEdit.EchoMode.Password)
        self.hf_token.setPlaceholderText("for gated models (kept in the system keyring)")
        form.addRow("Hugging Face token", self.hf_token)
        layout.addWidget(model)

        privacy = QGroupBox("Privacy")
        privacy_form = self._privacy_form = QFormLayout(privacy)
        self.privacy = privacy_picker()
        self.privacy.setAccessibleName("Who may read new chats")
        self.privacy_note = plain_label("")
        self.privacy_note.setWordWrap(True)
        self.trusted_peers = QPlainTextEdit()
        self.trusted_peers.setAccessibleName("Trusted peers, one peer id per line")
        self.trusted_peers.setPlaceholderText("12D3KooW… (one peer id per line)")
        self.trusted_peers.setMaximumHeight(72)
        self.privacy.currentIndexChanged.connect(lambda _: self._privacy_changed())
        privacy_form.addRow("Who may read new chats", self.privacy)
        privacy_form.addRow("", self.privacy_note)
        privacy_form.addRow("Trusted peers", self.trusted_peers)
        self.local_blocks = QSpinBox()
        self.local_blocks.setRange(0, 8)
        self.local_blocks.setSpecialValueText("none")
        self.local_blocks.setAccessibleName("Blocks run on this computer at each end of the model")
        self.local_blocks_row = plain_label(LOCAL_BLOCKS_SENTENCE)
        self.local_blocks_row.setWordWrap(True)
        self.local_blocks_row.setObjectName("muted")
        privacy_form.addRow("Blocks run on this computer", self.local_blocks)
        privacy_form.addRow("", self.local_blocks_row)
        self._privacy_changed()
        layout.addWidget(privacy)

        limits = QGroupBox("Limits")
        limits_form = QFormLayout(limits)
        self.memory_cap = QDoubleSpinBox()
        self.memory_cap.setRange(0, 4096)
        self.memory_cap.setSuffix(" GiB (0: no cap)")
        self.memory_cap.setAccessibleName("Memory cap in GiB; 0 is no cap")
        self.cpu_percent = QSpinBox()
        self.cpu_percent.setRange(10, 100)
        self.cpu_percent.setSingleStep(10)
        self.cpu_percent.setSuffix(" % of the processor cores")
        self.cpu_percent.setAccessibleName("Processor share for contributing, in percent of the cores")
        self.cpu_percent.setToolTip(
            "The block server computes with this share of the cores (fewer threads): each step is slower, "
            "none is paused, so the people using the swarm are never left waiting mid-answer."
        )
        self.cpu_percent.setValue(100)
        self.idle_only = QCheckBox("Only when the computer is idle")
        self.on_battery = QCheckBox("Also on battery")
        self.window = QLineEdit()
        self.window.setPlaceholderText("e.g. 22:00-07:00; empty: any time")
        self.autostart = QCheckBox("Start Corolla when I log in")
        self.contribute = QCheckBox("Contribute: serve part of the model for the swarm in the background")
        self.contribute.setChecked(True)
        self.contribute.setAccessibleName("Contribute this computer to the swarm")
        self.contribute.toggled.connect(lambda _: self._update_save_text())
        limits_form.addRow("", self.contribute)
        limits_form.addRow("Memory", self.memory_cap)
        self.cpu_row_label = QLabel("Processor")
        limits_form.addRow(self.cpu_row_label, self.cpu_percent)
        limits_form.addRow("", self.idle_only)
        limits_form.addRow("", self.on_battery)
        limits_form.addRow("Daily window", self.window)
        limits_form.addRow("", self.autostart)
        layout.addWidget(limits)

        # The dialog grows for a field that appears and never shrinks back: the spare room stays here,
        # below the sections, instead of opening gaps between them.
        layout.addStretch(1)
        # The error line and the buttons stay in view below the (scrolling) form.
        layout = outer
        self.error = plain_label("")
        self.error.setStyleSheet("color: #b03a2e")
        self.error.setWordWrap(True)
        layout.addWidget(self.error)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Save | QDialogButtonBox.StandardButton.Cancel)
        self.save_button = buttons.button(QDialogButtonBox.StandardButton.Save)
        if first_run:
            buttons.button(QDialogButtonBox.StandardButton.Cancel).setText("Not now")
            # "Agree and start contributing" is no Save: no floppy disk on it, nor a cancel sign on "Not now".
            for button in buttons.buttons():
                button.setIcon(QIcon())
        buttons.accepted.connect(self.save)
        buttons.rejected.connect(self.reject)
        layout.addWidget(buttons)
        self.private.setChecked(True)
        self._swarm_changed()
        self._update_save_text()
        self.client.call(
            "GET",
            routes.SETTINGS,
            on_ok=self.load,
            on_error=lambda e: self.error.setText(sentence(e)),
            answer=NodeSettings,
        )

    def _has(self, field: str) -> bool:
        """Whether the node has this setting (an older node lacks the newer ones)."""
        return self.settings is not None and self.settings.has(field)

    # --- who can join the private swarm -------------------------------------------------------------

    # --- swarms on this network ---------------------------------------------------------------------

    def done(self, result: int) -> None:
        self.lan_timer.stop()
        super().done(result)

    def _swarm_changed(self) -> None:
        """Only the chosen way of joining shows its field; the public swarm has nothing on the LAN to
        find or announce, so the discovery switch is not offered with it."""
        self.lan_discovery.setVisible(self._has("lan_discovery") and not self.public.isChecked())
        self.sharing_box.setVisible(self.private.isChecked() and self._has("swarm_port"))
        self.invite.setVisible(self.invite_option.isChecked())
        self.lan_box.setVisible(self.invite_option.isChecked())
        self.peers.setVisible(self.custom.isChecked())
        self._grow()  # squeezed, the peers box overlapped the switch
        if self.invite_option.isChecked():
            self.invite.setFocus()
        elif self.custom.isChecked():
            self.peers.setFocus()

    def _privacy_changed(self) -> None:
        level = self.privacy.currentData()
        self.privacy_note.setText(PRIVACY_SENTENCES[level])
        self.trusted_peers.setVisible(level == "peers")
        label = self._privacy_form.labelForField(self.trusted_peers)
        if label is not None:
            label.setVisible(level == "peers")

    def _update_save_text(self) -> None:
        if self.first_run:
            self.save_button.setText("Agree and start contributing" if self.contribute.isChecked() else "Save")

    def load(self, settings: NodeSettings) -> None:
        self.settings = settings
        {"private": self.private, "public": self.public, "custom": self.custom}[settings.swarm].setChecked(True)
        self.peers.setPlainText("\n".join(settings.custom_peers))
        self.model.setText(settings.model or "")
        self.dtype.setCurrentText(settings.torch_dtype)
        self.quant.setCurrentText(settings.quant_type)
        self.memory_cap.setValue(settings.memory_cap_gib or 0)
        self.idle_only.setChecked(settings.only_when_idle)
        self.on_battery.setChecked(settings.allow_on_battery)
        has_cpu = settings.has("cpu_percent")  # an older node has no such setting
        self.cpu_percent.setVisible(has_cpu)
        self.cpu_row_label.setVisible(has_cpu)
        self.cpu_percent.setValue(settings.cpu_percent)
        self.window.setText(settings.time_window or "")
        self.autostart.setChecked(autostart.is_enabled())
        self.contribute.setChecked(settings.contribute)
        self.lan_discovery.setChecked(settings.lan_discovery)
        (self.let_join if settings.listen_on_lan else self.only_here).setChecked(True)
        self.nat_port_map.setChecked(settings.nat_port_map)
        self.public_address.setText(settings.public_address or "")
        self._sharing_changed()
        self.lan_discovery.setVisible(settings.has("lan_discovery"))  # an older node has no such setting
        self.privacy.setCurrentIndex(max(0, self.privacy.findData(settings.default_privacy)))
        self.trusted_peers.setPlainText("\n".join(settings.trusted_peers))
        self.local_blocks.setValue(settings.chat_local_blocks)
        for widget in (self.local_blocks, self.local_blocks_row):  # an older node has no such setting
            widget.setVisible(settings.has("chat_local_blocks"))
        label = self._privacy_form.labelForField(self.local_blocks)
        if label is not None:
            label.setVisible(settings.has("chat_local_blocks"))
        self._swarm_changed()

    def check_model(self) -> None:

        query = {"torch_dtype": self.dtype.currentText(), "quant_type": self.quant.currentText()}
        if self.model.text().strip():
            query["model"] = self.model.text().strip()
        self.model_info.setText("Reading the model's configuration…")
        self.model_info.show()

        def shown(report: HardwareReport) -> None:
            plan = report.plan
            self.model_info.setText(
                "The node did not size this model."
                if plan is None
                else f"{plan.family} with {plan.num_blocks} blocks; each block needs "
                f"{human_bytes(plan.bytes_per_block)} plus {human_bytes(plan.cache_bytes_per_block)} of cache "
                f"in {plan.dtype}; this computer can serve {plural(plan.recommended_blocks, 'block')}."
            )
            self._grow()

        self.client.call(
            "GET",
            routes.hardware(query),
            on_ok=shown,
            on_error=lambda e: (self.model_info.setText(sentence(f"Cannot use this model: {e}")), self._grow()),
            answer=HardwareReport,
        )

    def _grow(self) -> None:
        """Grow (never shrink) to fit text that just appeared: squeezed, the boxes below it overlapped."""
        self.form_scroll.widget().layout().activate()
        self.form_scroll.updateGeometry()
        self.layout().activate()
        self.resize(self.width(), max(self.height(), self.sizeHint().height()))

    def _changes(self) -> dict:
        swarm = "private" if self.private.isChecked() else "public" if self.public.isChecked() else "custom"
        return {
            **(self.settings.with_changes() if self.settings is not None else {}),
            "swarm": swarm,
            "model": self.model.text().strip() or None,
            # Peers typed under another choice are not checked or kept: only the chosen way counts.
            "custom_peers": [p.strip() for p in self.peers.toPlainText().splitlines() if p.strip()]
            if swarm == "custom"
            else (self.settings.custom_peers if self.settings is not None else []),
            "torch_dtype": self.dtype.currentText(),
            "quant_type": self.quant.currentText(),
            "memory_cap_gib": self.memory_cap.value() or None,
            "only_when_idle": self.idle_only.isChecked(),
            "allow_on_battery": self.on_battery.isChecked(),
            **({"cpu_percent": self.cpu_percent.value()} if self._has("cpu_percent") else {}),
            "time_window": self.window.text().strip() or None,
            "contribute": self.contribute.isChecked(),
            **self._sharing_changes(swarm),
            **self._lan_changes(swarm),
            **self._privacy_changes(),
        }

    def _privacy_changes(self) -> dict:
        if not self._has("default_privacy"):
            return {}  # an older node has no privacy settings
        peers = [p.strip() for p in self.trusted_peers.toPlainText().splitlines() if p.strip()]
        changes = {"default_privacy": self.privacy.currentData(), "trusted_peers": peers}
        if self._has("chat_local_blocks"):
            changes["chat_local_blocks"] = self.local_blocks.value()
        return changes

    def save(self) -> None:
        self.error.setText("")
        peers = [p.strip() for p in self.peers.toPlainText().splitlines() if p.strip()]
        invite = self.invite.text().strip() if self.invite_option.isChecked() else None
        problems = local_problems(self.window.text().strip(), peers, self.custom.isChecked(), invite)
        if problems:
            self.error.setText("\n".join(problems))
            return
        try:
            autostart.set_enabled(self.autostart.isChecked())
        except OSError as exc:
            self.error.setText(sentence(f"Could not change start at login: {exc}"))
            return
        if self.hf_token.text().strip():
            self.client.call(
                "PUT",
                routes.HF_TOKEN,
                {"token": self.hf_token.text().strip()},
                on_error=lambda e: self.error.setText(sentence(e)),
                answer=ActionResult,
                request=HfToken,
            )

        def saved(settings: NodeSettings) -> None:
            self.settings = settings
            if not self.first_run:  # the node itself starts or stops when `contribute` changed
                self.accept()
                return
            # The user's decision on contributing is what lets a first-run node start serving.
            action = "start" if self.contribute.isChecked() else "stop"
            self.client.call(
                "POST",
                routes.contribution(action),
                on_ok=lambda _: self.accept(),
                on_error=lambda e: self.error.setText(sentence(f"Saved, but could not {action} contributing: {e}")),
                answer=ActionResult,
            )

        if self.invite_option.isChecked():
            self.client.call(
                "POST",
                routes.JOIN,
                {"invite": self.invite.text().strip()},
                on_ok=saved,
                on_error=lambda e: self.error.setText(sentence(f"This invite does not work: {friendly_error(e)}")),
                answer=NodeSettings,
                request=Invite,
            )
        else:
            self.client.call(
                "PUT",
                routes.SETTINGS,
                self._changes(),
                on_ok=saved,
                on_error=lambda e: self.error.setText(sentence(f"Not saved. {friendly_error(e)}")),
                answer=NodeSettings,
                request=NodeSettings,
            )
