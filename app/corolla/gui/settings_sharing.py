"""The settings dialog's parts about other computers: who may join this computer's private swarm (the
choice, its port, the fixes) and the swarms announced on this network (listing them, joining one)."""

from __future__ import annotations

from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QHBoxLayout,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QRadioButton,
    QVBoxLayout,
    QWidget,
)

from corolla.api import routes
from corolla.api.models import LanSwarms
from corolla.gui.node_settings import NodeSettings
from corolla.gui.settings_checks import friendly_error
from corolla.gui.widgets import plain_label, sentence

LAN_REFRESH_MS = 3000


class SharingSettingsMixin:
    """Sharing and LAN discovery sections of SettingsDialog (settings_dialog.py): uses its client, settings,
    error label and swarm radio buttons."""

    def _sharing_section(self) -> QWidget:
        """This computer only / Let others join, each explained in one sentence (with the kept port)."""
        self.sharing_box = QWidget()
        box = QVBoxLayout(self.sharing_box)
        box.setContentsMargins(24, 0, 0, 0)
        self.only_here = QRadioButton("This computer only")
        self.let_join = QRadioButton("Let others join")
        self.sharing_choice = QButtonGroup(self)
        row = QHBoxLayout()
        for button in (self.only_here, self.let_join):
            self.sharing_choice.addButton(button)
            row.addWidget(button)
            button.toggled.connect(lambda _: self._sharing_changed())
        row.addStretch(1)
        box.addLayout(row)
        self.sharing_note = plain_label("")
        self.sharing_note.setWordWrap(True)
        self.sharing_note.setObjectName("muted")
        box.addWidget(self.sharing_note)
        self.nat_port_map = QCheckBox("Ask the router to open the port (NAT-PMP/UPnP)")
        self.nat_port_map.setToolTip(
            "Off unless you switch it on: Corolla then asks your home router to forward the swarm's port to "
            "this computer, so friends in other homes can reach it directly."
        )
        box.addWidget(self.nat_port_map)
        self.public_address = QLineEdit()
        self.public_address.setPlaceholderText(
            "Forwarded the port by hand? Your router's public address, e.g. 203.0.113.7"
        )
        self.public_address.setAccessibleName(
            "The router's public address, where the port is forwarded to this computer"
        )
        box.addWidget(self.public_address)
        self.only_here.setChecked(True)
        return self.sharing_box

    def _sharing_changed(self) -> None:
        port = self.settings.swarm_port if self.settings is not None else None
        on = f"port {port}" if port else "a port chosen once, when it first starts"
        self.sharing_note.setText(
            f"Other computers connect to this one on {on}; you share an invite with them."
            if self.let_join.isChecked()
            else "The swarm listens on this computer only: nobody else can join it."
        )
        self.nat_port_map.setVisible(self.let_join.isChecked() and self._has("nat_port_map"))
        self.public_address.setVisible(self.let_join.isChecked() and self._has("public_address"))

    def _sharing_changes(self, swarm: str) -> dict:
        if not self._has("swarm_port"):
            return {}  # an older node: no such choice
        changes = {"nat_port_map": self.nat_port_map.isChecked()}
        if self._has("public_address"):
            changes["public_address"] = self.public_address.text().strip() or None
        if swarm == "private":
            changes["listen_on_lan"] = self.let_join.isChecked()
        return changes

    def _lan_section(self) -> QWidget:
        """ "Swarms on this network": the node's mDNS findings, each joinable with one click."""
        self.lan_box = QWidget()
        box = QVBoxLayout(self.lan_box)
        box.setContentsMargins(0, 0, 0, 0)
        box.addWidget(plain_label("Swarms on this network"))
        row = QHBoxLayout()
        self.lan_list = QListWidget()
        self.lan_list.setAccessibleName("Swarms on this network")
        self.lan_list.setMaximumHeight(90)
        self.lan_list.itemSelectionChanged.connect(self._lan_selection_changed)
        self.lan_list.itemDoubleClicked.connect(lambda _: self.join_lan_swarm())
        self.lan_join = QPushButton("Join")
        self.lan_join.setEnabled(False)
        self.lan_join.clicked.connect(self.join_lan_swarm)
        row.addWidget(self.lan_list, 1)
        row.addWidget(self.lan_join, 0, Qt.AlignmentFlag.AlignTop)
        box.addLayout(row)
        self.lan_note = plain_label("")
        self.lan_note.setWordWrap(True)
        box.addWidget(self.lan_note)
        self.lan_available = True
        self.lan_timer = QTimer(self)
        self.lan_timer.setInterval(LAN_REFRESH_MS)
        self.lan_timer.timeout.connect(self.refresh_lan)
        self.lan_timer.start()
        self.refresh_lan()
        return self.lan_box

    def refresh_lan(self) -> None:
        self.client.call(
            "GET", routes.LAN_SWARMS, on_ok=self._show_lan, on_error=self._lan_unavailable, answer=LanSwarms
        )

    def _lan_unavailable(self, message: str) -> None:
        # An older node without the endpoint (or one that stopped): the invite field still works.
        self.lan_timer.stop()
        self.lan_available = False
        self.lan_list.clear()
        self.lan_join.setEnabled(False)
        self.lan_note.setText("This node cannot list swarms on this network; paste an invite instead.")

    def _show_lan(self, lan: LanSwarms) -> None:
        chosen = self._chosen_lan_invite()
        self.lan_list.clear()
        for swarm in lan.swarms:
            item = QListWidgetItem(f"{swarm.name} — {swarm.model}")
            item.setData(Qt.ItemDataRole.UserRole, swarm.invite)
            item.setToolTip("\n".join(swarm.peers))
            self.lan_list.addItem(item)
            if swarm.invite == chosen:
                item.setSelected(True)
        if not lan.enabled:
            note = "Switch on “Find swarms on this network” below to see them."
        elif not lan.swarms:
            note = "Looking… no swarm is announced on this network yet."
        else:
            note = ""
        self.lan_note.setText(note)
        self._lan_selection_changed()

    def _chosen_lan_invite(self) -> str | None:
        items = self.lan_list.selectedItems()
        return items[0].data(Qt.ItemDataRole.UserRole) if items else None

    def _lan_selection_changed(self) -> None:
        self.lan_join.setEnabled(self._chosen_lan_invite() is not None)

    def join_lan_swarm(self) -> None:
        """Join the chosen swarm through its invite, exactly as if it had been pasted."""
        invite = self._chosen_lan_invite()
        if invite is None:
            return
        self.invite.setText(invite)
        self.save()

    def _lan_discovery_toggled(self, checked: bool) -> None:
        """Takes effect at once, so the list fills while the dialog is open."""
        if self.settings is None:
            return

        def applied(settings: NodeSettings) -> None:
            self.settings = settings
            self.refresh_lan()

        self.client.call(
            "PUT",
            routes.SETTINGS,
            self.settings.with_changes(lan_discovery=checked),
            on_ok=applied,
            on_error=lambda e: self.error.setText(sentence(f"Not saved. {friendly_error(e)}")),
            answer=NodeSettings,
            request=NodeSettings,
        )

    def _lan_changes(self, swarm: str) -> dict:
        if not self._has("lan_discovery"):
            return {}
        on = self.lan_discovery.isChecked() and swarm != "public"  # not offered there: off
        changes = {"lan_discovery": on}
        if on and swarm == "private":
            # Announcing a private swarm is only useful if neighbours can reach it.
            changes["listen_on_lan"] = True
        return changes
