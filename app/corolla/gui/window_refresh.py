"""The main window's reads of the node: its status (the banner, the panes, the tray), the swarm, the
stats, the settings the chat needs, each answer read as its corolla.api model, one request of a kind
at a time."""

from __future__ import annotations

from PySide6.QtWidgets import QSystemTrayIcon

from corolla.api import models as m
from corolla.api import routes
from corolla.gui.node_client import Unreadable
from corolla.gui.node_settings import NodeSettings
from corolla.gui.status_text import status_line
from corolla.gui.tray import tray_state
from corolla.gui.widgets import route_text, sentence

# The swarm read is a DHT read and a route on the node: every 5 s only while someone looks at the map;
# with another pane shown, every 30 s (the chat's model list and route); nothing while the window is hidden.
SWARM_POLL_MS = 5000
SWARM_POLL_OTHER_PANES = 6


class NodeRefresh:
    """The window's refreshes (MainWindow mixes this in)."""

    def _once(
        self, key: str, method: str, path: str, on_ok, on_error=None, timeout_ms: int = 10_000, answer=None
    ) -> None:
        """One request of a kind at a time: a slow node is not buried under polls."""
        if key in self._in_flight:
            return
        self._in_flight.add(key)

        def ok(payload):
            self._in_flight.discard(key)
            on_ok(payload)

        def failed(message):
            self._in_flight.discard(key)
            if on_error is not None:
                on_error(message)

        self.client.call(method, path, on_ok=ok, on_error=failed, timeout_ms=timeout_ms, answer=answer)

    def refresh_all(self) -> None:
        self.refresh_status()
        self.refresh_swarm()
        self.refresh_stats()
        self.chat.refresh_chats()
        self._once(
            "settings",
            "GET",
            routes.SETTINGS,
            lambda s: self.chat.set_default_privacy(s.default_privacy if s.has("default_privacy") else None),
            self._say_unreadable,
            answer=NodeSettings,
        )
        self.client.call(
            "GET",
            routes.HARDWARE,
            on_ok=self.contribute.show_hardware,
            on_error=lambda e: self.contribute.hardware.setText(sentence(f"Not available: {e}")),
            answer=m.HardwareReport,
        )

    def _say_unreadable(self, message: str) -> None:
        """A poll whose failures are otherwise quiet still says when the node answers in another form."""
        if isinstance(message, Unreadable):
            self.banner.setText(sentence(message))

    def refresh_status(self) -> None:
        self._once(
            "status", "GET", routes.STATUS, self._status_shown, self._node_unreachable, 5000, answer=m.NodeStatus
        )

    def _status_shown(self, status: m.NodeStatus) -> None:
        was_unreachable = not self.reachable
        before = self.status.contribution.state if self.status is not None else None
        self.status, self.reachable = status, True
        self.node_banner.hide()
        self._restart_timer.stop()
        self.contribute.show_status(status)
        self.chat.status_changed(status)
        self.stats.show_lifetime(status.lifetime)
        if self.contribute.hardware_report is None and status.contribution.state == "online":
            self._once(
                "hardware", "GET", routes.HARDWARE, self.contribute.show_hardware, None, 60_000, m.HardwareReport
            )
        if not status.awaiting_consent:
            self.consent_known.emit()
        c = status.contribution
        self.banner.setText(f"{status.model} · {status.swarm} swarm · secrets: {status.secrets_storage}")
        if self.tray is not None:
            state = "idle" if status.awaiting_consent else tray_state(c.state)
            was = self.tray.state
            self.tray.set_state(state, status_line(status))
            if state == "error" and was == "contributing" and self.tray.supportsMessages():
                self.tray.showMessage("Corolla stopped contributing", c.reason, QSystemTrayIcon.MessageIcon.Warning)
        if was_unreachable:
            self.chat.node_back()
            self.refresh_all()
        elif before is not None and before != c.state:
            # Paused or resumed: the chat's "by N servers" and the map follow now, not at the next poll.
            self.refresh_swarm(fresh=True)

    def _node_unreachable(self, message: str) -> None:
        was_reachable = self.reachable
        self.status, self.reachable = None, False
        self.chat.status_changed(None)
        restarting = self._restart_timer.isActive()
        unreadable = isinstance(message, Unreadable)
        if unreadable:  # it answers, in the form of another version: say so, in one line
            self.node_banner_text.setText(sentence(message))
        else:
            self.node_banner_text.setText(
                "Starting the node…"
                if restarting
                else "The node is not running: nothing is contributed and chat is unavailable."
            )
        # The technical reason (e.g. "Connection refused") is for whoever asks, on hover.
        self.node_banner_text.setToolTip(sentence(message.removeprefix("the node does not answer ").strip("()")))
        self.restart_button.setEnabled(not restarting)
        self.node_banner.show()
        self.banner.setText("The node's answers cannot be read." if unreadable else "The node does not answer.")
        self.contribute.show_unreachable()
        if was_reachable:  # once, when it goes: the panes stop showing what the node last said
            self.swarm.show_unreachable()
            self.chat.show_unreachable()
        if self.tray is not None:
            self.tray.set_state("unreachable", status_line(None))

    def refresh_swarm(self, fresh: bool = False) -> None:
        """Reads the swarm; `fresh`: a read already under way began before a change, so read again after it."""
        if not self.reachable:
            return
        if fresh and "swarm" in self._in_flight:
            self._swarm_again = True
            return

        def again() -> None:
            if self._swarm_again:
                self._swarm_again = False
                self.refresh_swarm()

        def shown(models: list[m.SwarmModel]) -> None:
            self._swarm_read_once = True
            # The node says which prefix its model has (None until it knows: no swarm read yet).
            own = self.status.dht_prefix if self.status is not None else None
            prefix = next((x.dht_prefix for x in models if x.dht_prefix == own), None)
            # The embedded model by its name, not its swarm prefix (the converted folder's name).
            card = self.status.model_card if self.status is not None else None
            own_name = card.name if card is not None and prefix is not None and card.dht_prefix == prefix else None
            self.swarm.own_prefix, self.swarm.own_name = prefix, own_name
            self.swarm.show_swarm(models)
            self.chat.show_models(models, prefix, own_name)
            model = next((x for x in models if x.dht_prefix == prefix), models[0] if models else None)
            self.chat.route_text = route_text(model.route if model is not None else [])
            again()

        def failed(message: str) -> None:
            self.swarm.show_error(message)
            # The model list says so rather than go on naming servers it last saw (e.g. the only one paused).
            paused = self.status is not None and self.status.contribution.state == "paused"
            if paused:
                note = "No server to reach while contribution is paused"
            else:
                note = "The swarm cannot be read now" if self._swarm_read_once else "The swarm cannot be read yet"
            self.chat.show_unreachable(note)
            self.chat.model_picker.setToolTip(sentence(message))
            again()

        self._once("swarm", "GET", routes.SWARM, shown, failed, timeout_ms=90_000, answer=list[m.SwarmModel])

    def _poll_swarm(self) -> None:
        self._swarm_ticks += 1
        if not self.isVisible():
            return
        looked_at = self.tabs.currentWidget() is self.swarm
        unknown = not self.chat.model_picker.itemData(0)  # the chat has no model list yet
        if looked_at or unknown or self._swarm_ticks % SWARM_POLL_OTHER_PANES == 0:
            self.refresh_swarm()

    def refresh_stats(self) -> None:
        if self.reachable:
            path = routes.stats_history(self.stats.hours)
            self._once("stats", "GET", path, self.stats.show_history, self._say_unreadable, answer=list[m.HourStats])
