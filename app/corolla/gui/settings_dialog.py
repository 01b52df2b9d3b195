"""Settings, also shown on first run: the swarm, the model (with its size and memory need), the Hugging
Face token, contribution limits, and start at login."""

from __future__ import annotations

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
    QVBoxLayout,
    QWidget,
)

from corolla.gui import autostart
from corolla.gui.node_client import NodeClient
from corolla.units import human_bytes


class SettingsDialog(QDialog):
    def __init__(self, client: NodeClient, first_run: bool = False, parent: QWidget | None = None):
        super().__init__(parent)
        self.client = client
        self.settings: dict | None = None
        self.setWindowTitle("Welcome to Corolla" if first_run else "Corolla settings")
        self.setMinimumWidth(620)
        layout = QVBoxLayout(self)
        if first_run:
            intro = QLabel(
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
        self.invite = QLineEdit()
        self.invite.setPlaceholderText("corolla-invite:…")
        self.peers = QPlainTextEdit()
        self.peers.setMaximumHeight(60)
        swarm_layout.addWidget(self.invite)
        swarm_layout.addWidget(self.peers)
        layout.addWidget(swarm)

        model = QGroupBox("Model")
        form = QFormLayout(model)
        row = QHBoxLayout()
        self.model = QLineEdit()
        self.model.setPlaceholderText("Hugging Face id or a folder; empty: the offline demo model")
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
        self.model_info = QLabel("")
        self.model_info.setWordWrap(True)
        form.addRow("", self.model_info)
        self.hf_token = QLineEdit()
        self.hf_token.setEchoMode(QLineEdit.EchoMode.Password)
        self.hf_token.setPlaceholderText("for gated models (kept in the system keyring)")
        form.addRow("Hugging Face token", self.hf_token)
        layout.addWidget(model)

        limits = QGroupBox("Limits")
        limits_form = QFormLayout(limits)
        self.memory_cap = QDoubleSpinBox()
        self.memory_cap.setRange(0, 4096)
        self.memory_cap.setSuffix(" GiB (0: no cap)")
        self.idle_only = QCheckBox("Only when the computer is idle")
        self.on_battery = QCheckBox("Also on battery")
        self.window = QLineEdit()
        self.window.setPlaceholderText("e.g. 22:00-07:00; empty: any time")
        self.autostart = QCheckBox("Start Corolla when I log in")
        limits_form.addRow("Memory", self.memory_cap)
        limits_form.addRow("", self.idle_only)
        limits_form.addRow("", self.on_battery)
        limits_form.addRow("Daily window", self.window)
        limits_form.addRow("", self.autostart)
        layout.addWidget(limits)

        self.error = QLabel("")
        self.error.setStyleSheet("color: #b03a2e")
        self.error.setWordWrap(True)
        layout.addWidget(self.error)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Save | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.save)
        buttons.rejected.connect(self.reject)
        layout.addWidget(buttons)
        self.client.call("GET", "/api/settings", on_ok=self.load, on_error=self.error.setText)

    def load(self, settings: dict) -> None:
        self.settings = settings
        {"private": self.private, "public": self.public, "custom": self.custom}[settings["swarm"]].setChecked(True)
        self.peers.setPlainText("\n".join(settings["custom_peers"]))
        self.model.setText(settings.get("model") or "")
        self.dtype.setCurrentText(settings["torch_dtype"])
        self.quant.setCurrentText(settings["quant_type"])
        self.memory_cap.setValue(settings.get("memory_cap_gib") or 0)
        self.idle_only.setChecked(settings["only_when_idle"])
        self.on_battery.setChecked(settings["allow_on_battery"])
        self.window.setText(settings.get("time_window") or "")
        self.autostart.setChecked(autostart.is_enabled())

    def check_model(self) -> None:
        from urllib.parse import urlencode

        query = {"torch_dtype": self.dtype.currentText(), "quant_type": self.quant.currentText()}
        if self.model.text().strip():
            query["model"] = self.model.text().strip()
        self.model_info.setText("Reading the model's configuration…")

        def shown(report: dict) -> None:
            plan = report["plan"]
            self.model_info.setText(
                f"{plan['family']} with {plan['num_blocks']} blocks; each block needs "
                f"{human_bytes(plan['bytes_per_block'])} plus {human_bytes(plan['cache_bytes_per_block'])} of cache "
                f"in {plan['dtype']}; this computer can serve {plan['recommended_blocks']} block(s)."
            )

        self.client.call(
            "GET",
            f"/api/hardware?{urlencode(query)}",
            on_ok=shown,
            on_error=lambda e: self.model_info.setText(f"Cannot use this model: {e}"),
        )

    def _changes(self) -> dict:
        swarm = "private" if self.private.isChecked() else "public" if self.public.isChecked() else "custom"
        return {
            **(self.settings or {}),
            "swarm": swarm,
            "model": self.model.text().strip() or None,
            "custom_peers": [p.strip() for p in self.peers.toPlainText().splitlines() if p.strip()],
            "torch_dtype": self.dtype.currentText(),
            "quant_type": self.quant.currentText(),
            "memory_cap_gib": self.memory_cap.value() or None,
            "only_when_idle": self.idle_only.isChecked(),
            "allow_on_battery": self.on_battery.isChecked(),
            "time_window": self.window.text().strip() or None,
        }

    def save(self) -> None:
        self.error.setText("")
        try:
            autostart.set_enabled(self.autostart.isChecked())
        except OSError as exc:
            self.error.setText(f"Could not change start at login: {exc}")
            return
        if self.hf_token.text().strip():
            self.client.call(
                "PUT", "/api/secrets/hf-token", {"token": self.hf_token.text().strip()}, on_error=self.error.setText
            )

        def saved(settings: dict) -> None:
            self.settings = settings
            self.accept()

        if self.invite_option.isChecked():
            self.client.call(
                "POST",
                "/api/settings/join",
                {"invite": self.invite.text().strip()},
                on_ok=saved,
                on_error=lambda e: self.error.setText(f"This invite does not work: {e}"),
            )
        else:
            self.client.call(
                "PUT",
                "/api/settings",
                self._changes(),
                on_ok=saved,
                on_error=lambda e: self.error.setText(f"Not saved: {e}"),
            )
