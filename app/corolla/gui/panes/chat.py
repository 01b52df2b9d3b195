"""Chat: conversations on the left (search, rename, delete with undo, export), the transcript with
Markdown, a status line, and the message box (Enter sends, Shift+Enter starts a new line, Esc stops)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from PySide6.QtCore import QSettings, Qt, QTimer, Signal
from PySide6.QtGui import QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QHBoxLayout,
    QInputDialog,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QMenu,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from corolla.gui.node_client import NodeClient
from corolla.gui.prefs import read_float, read_int
from corolla.gui.transcript import Transcript
from corolla.gui.widgets import plain_label, plural, sentence
from corolla.node.api_models import PRIVACY_LABELS, PRIVACY_SENTENCES

MAX_NEW_TOKENS = 2048  # the node's limit per reply (corolla.node.api_models.MAX_NEW_TOKENS; a test checks)
NEW_TITLE = "New chat"
TITLE_CHARS = 48
UNDO_SECONDS = 8


def auto_title(text: str) -> str:
    """A chat's title from its first message: the first line, shortened at a word."""
    line = " ".join(text.strip().split("\n", 1)[0].split())
    if len(line) <= TITLE_CHARS:
        return line or NEW_TITLE
    cut = line[:TITLE_CHARS].rsplit(" ", 1)[0]
    return (cut or line[:TITLE_CHARS]) + "…"


def chat_markdown(chat: dict, messages: list[dict]) -> str:
    lines = [f"# {chat['title']}", ""]
    if chat.get("model"):
        lines += [f"_Model: {chat['model']}_", ""]
    if chat.get("system_prompt"):
        lines += ["**System:** " + chat["system_prompt"], ""]
    for m in messages:
        who = "You" if m["role"] == "user" else "Assistant"
        note = "" if m.get("status", "complete") == "complete" else f" ({m['status']})"
        lines += [f"## {who}{note}", "", m["content"], ""]
    return "\n".join(lines)


class MessageBox(QPlainTextEdit):
    """Enter sends; Shift+Enter (or Ctrl+Enter) inserts a new line."""

    submitted = Signal()

    def keyPressEvent(self, event) -> None:
        if event.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter) and not (
            event.modifiers() & (Qt.KeyboardModifier.ShiftModifier | Qt.KeyboardModifier.ControlModifier)
        ):
            self.submitted.emit()
            return
        if event.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter):
            self.insertPlainText("\n")
            return
        super().keyPressEvent(event)


class ChatPane(QWidget):
    reply_finished = Signal(dict)
    resume_requested = Signal()

    def __init__(self, client: NodeClient, prefs: QSettings, parent: QWidget | None = None):
        super().__init__(parent)
        self.client, self.prefs = client, prefs
        self.chat_id: str | None = None
        self.chat: dict | None = None
        self.chat_list: list[dict] = []
        self.stream = None
        self.reply_text = ""
        self.started = 0.0
        self.pieces = 0
        self.messages: list[dict] = []
        self.node_status: dict | None = None
        self.route_text = ""
        self.pending_delete: dict | None = None
        self._replacing = False  # a regenerate: the answers after the last question go when the node says
        self._unsent: str | None = None  # a message sent but not yet confirmed by the node
        self._resend_when_online = False  # "Resume contributing" was pressed: ask again once online
        self._continuing: str | None = None  # Continue: the answer as it was before, until the node is done

        outer = QHBoxLayout(self)
        outer.setContentsMargins(6, 6, 6, 6)
        self.splitter = QSplitter(Qt.Orientation.Horizontal)
        self.splitter.setObjectName("chatSplitter")
        outer.addWidget(self.splitter)

        side = QWidget()
        side_layout = QVBoxLayout(side)
        side_layout.setContentsMargins(0, 0, 0, 0)
        self.new_button = QPushButton("&New chat")
        self.new_button.setToolTip("Start a new conversation (Ctrl+N)")
        self.new_button.setAccessibleName("New chat")
        self.new_button.clicked.connect(lambda: self.new_chat())
        self.search = QLineEdit()
        self.search.setPlaceholderText("Search chats")
        self.search.setAccessibleName("Search chats")
        self.search.setClearButtonEnabled(True)
        self._search_timer = QTimer(self)
        self._search_timer.setSingleShot(True)
        self._search_timer.setInterval(250)
        self._search_timer.timeout.connect(self.refresh_chats)
        self.search.textChanged.connect(lambda _: self._search_timer.start())
        self.chats = QListWidget()
        self.chats.setAccessibleName("Conversations")
        # A long title ends in "…" (its tooltip has all of it) instead of scrolling the list sideways.
        self.chats.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.chats.setTextElideMode(Qt.TextElideMode.ElideRight)
        self.chats.currentItemChanged.connect(self._chat_selected)
        self.chats.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.chats.customContextMenuRequested.connect(self._chat_menu)
        self.undo_bar = QWidget()
        undo_row = QHBoxLayout(self.undo_bar)
        undo_row.setContentsMargins(0, 0, 0, 0)
        self.undo_label = plain_label("")
        self.undo_label.setWordWrap(True)
        self.undo_button = QPushButton("Undo")
        self.undo_button.setAccessibleName("Undo deleting the chat")
        self.undo_button.clicked.connect(self.undo_delete)
        undo_row.addWidget(self.undo_label, 1)
        undo_row.addWidget(self.undo_button)
        self.undo_bar.hide()
        self._delete_timer = QTimer(self)
        self._delete_timer.setSingleShot(True)
        self._delete_timer.timeout.connect(self.commit_delete)
        for widget in (self.new_button, self.search, self.chats, self.undo_bar):
            side_layout.addWidget(widget)
        self.splitter.addWidget(side)

        main = QWidget()
        main_layout = QVBoxLayout(main)
        main_layout.setContentsMargins(0, 0, 0, 0)
        top = QHBoxLayout()
        self.model_picker = QComboBox()
        self.model_picker.setAccessibleName("Model")
        self.model_picker.setToolTip("The models this swarm serves, with how many of their blocks are served")
        self.model_picker.setMinimumContentsLength(30)
        self.model_picker.activated.connect(self._model_picked)
        top.addWidget(QLabel("Model"))
        top.addWidget(self.model_picker, 1)
        self.settings_toggle = QPushButton("&Parameters")
        self.settings_toggle.setCheckable(True)
        self.settings_toggle.setAccessibleName("Show the sampling parameters")
        top.addWidget(self.settings_toggle)
        main_layout.addLayout(top)

        # Who may read this chat: the level (per chat; new chats take the node's default_privacy).
        privacy_row = QHBoxLayout()
        self.privacy_picker = QComboBox()
        self.privacy_picker.setAccessibleName("Who may read this chat")
        for level, label in PRIVACY_LABELS.items():
            self.privacy_picker.addItem(label, level)
            self.privacy_picker.setItemData(
                self.privacy_picker.count() - 1, PRIVACY_SENTENCES[level], Qt.ItemDataRole.ToolTipRole
            )
        self.privacy_picker.activated.connect(self._privacy_picked)
        self.privacy_note = plain_label("")
        self.privacy_note.setObjectName("muted")
        self.privacy_note.setWordWrap(True)
        self.privacy_note.setAccessibleName("What the privacy level means")
        self.privacy_label = QLabel("Who may read")
        privacy_row.addWidget(self.privacy_label)
        privacy_row.addWidget(self.privacy_picker)
        privacy_row.addWidget(self.privacy_note, 1)
        main_layout.addLayout(privacy_row)
        self.default_privacy = "any"  # the node's default_privacy setting (the window sets it)
        self.privacy_supported = True

        self.parameters = QWidget()
        settings = QHBoxLayout(self.parameters)
        settings.setContentsMargins(0, 0, 0, 0)
        self.system = QLineEdit()
        self.system.setPlaceholderText("System prompt (for new chats)")
        self.system.setAccessibleName("System prompt for new chats")
        self.temperature = QDoubleSpinBox()
        self.temperature.setRange(0.0, 2.0)
        self.temperature.setSingleStep(0.1)
        self.temperature.setPrefix("temperature ")
        self.temperature.setAccessibleName("Temperature")
        self.temperature.setToolTip("0 answers the same way every time; higher is more varied")
        self.top_p = QDoubleSpinBox()
        self.top_p.setRange(0.05, 1.0)
        self.top_p.setSingleStep(0.05)
        self.top_p.setPrefix("top-p ")
        self.top_p.setAccessibleName("Top-p")
        self.max_tokens = QSpinBox()
        self.max_tokens.setRange(1, MAX_NEW_TOKENS)
        self.max_tokens.setPrefix("max tokens ")
        self.max_tokens.setSuffix(f" / {MAX_NEW_TOKENS}")
        self.max_tokens.setAccessibleName("Maximum new tokens per reply")
        self.max_tokens.setToolTip(f"The node writes at most {MAX_NEW_TOKENS} new tokens per reply")
        for widget in (self.system, self.temperature, self.top_p, self.max_tokens):
            settings.addWidget(widget, 2 if widget is self.system else 0)
        self.system.setText(str(prefs.value("chat/system_prompt", "") or ""))
        self.temperature.setValue(read_float(prefs, "chat/temperature", 0.0))
        self.top_p.setValue(read_float(prefs, "chat/top_p", 1.0))
        self.max_tokens.setValue(read_int(prefs, "chat/max_tokens", 256))
        self.temperature.valueChanged.connect(lambda v: prefs.setValue("chat/temperature", v))
        self.top_p.valueChanged.connect(lambda v: prefs.setValue("chat/top_p", v))
        self.max_tokens.valueChanged.connect(lambda v: prefs.setValue("chat/max_tokens", v))
        self.system.textChanged.connect(lambda v: prefs.setValue("chat/system_prompt", v))
        self.settings_toggle.toggled.connect(self.parameters.setVisible)
        self.settings_toggle.toggled.connect(lambda on: prefs.setValue("chat/parameters_shown", on))
        shown = str(prefs.value("chat/parameters_shown", "false")).lower() == "true"
        self.settings_toggle.setChecked(shown)
        self.parameters.setVisible(shown)
        main_layout.addWidget(self.parameters)

        self.transcript = Transcript()
        self.transcript.retry_requested.connect(self.retry)
        self.transcript.resume_requested.connect(self._resume_and_resend)
        self.transcript.continue_requested.connect(self.continue_reply)
        main_layout.addWidget(self.transcript, 1)
        self.info = plain_label("")
        self.info.setObjectName("muted")
        self.info.setWordWrap(True)
        self.info.setAccessibleName("Chat status")
        main_layout.addWidget(self.info)
        self.seen_by = plain_label("")
        self.seen_by.setObjectName("muted")
        self.seen_by.setWordWrap(True)
        self.seen_by.setAccessibleName("Who saw the last reply")
        main_layout.addWidget(self.seen_by)
        entry = QHBoxLayout()
        self.input = MessageBox()
        self.input.setPlaceholderText("Message the swarm — Enter sends, Shift+Enter for a new line")
        self.input.setAccessibleName("Message")
        self.input.setTabChangesFocus(True)
        self.input.setMaximumHeight(96)
        self.input.submitted.connect(self.send)
        self.send_button, self.stop_button = QPushButton("Send"), QPushButton("Stop")
        self.regenerate_button = QPushButton("Regenerate")
        self.send_button.setAccessibleName("Send the message")
        self.stop_button.setAccessibleName("Stop the reply")
        self.stop_button.setToolTip("Stop the reply (Esc); what arrived is kept")
        self.regenerate_button.setAccessibleName("Answer the last message again")
        self.send_button.setDefault(True)
        self.stop_button.setEnabled(False)
        self.send_button.clicked.connect(self.send)
        self.stop_button.clicked.connect(self.stop)
        self.regenerate_button.clicked.connect(self.regenerate)
        entry.addWidget(self.input, 1)
        buttons = QVBoxLayout()
        for button in (self.send_button, self.stop_button, self.regenerate_button):
            buttons.addWidget(button)
        entry.addLayout(buttons)
        main_layout.addLayout(entry)
        self.splitter.addWidget(main)
        self.splitter.setStretchFactor(0, 1)
        self.splitter.setStretchFactor(1, 4)
        self.splitter.setSizes([240, 760])
        state = prefs.value("chat/splitter")
        if state is not None:
            self.splitter.restoreState(state)
        self.splitter.splitterMoved.connect(lambda *_: prefs.setValue("chat/splitter", self.splitter.saveState()))

        escape = QShortcut(QKeySequence(Qt.Key.Key_Escape), self, context=Qt.ShortcutContext.WidgetWithChildrenShortcut)
        escape.activated.connect(self.stop)
        # Ctrl+F, F2, Ctrl+R and Ctrl+N are the window's (its Chat menu); Del deletes the chat picked in the list.
        delete = QShortcut(QKeySequence(Qt.Key.Key_Delete), self.chats, context=Qt.ShortcutContext.WidgetShortcut)
        delete.activated.connect(self._delete_current)
        self.setTabOrder(self.new_button, self.search)
        self.setTabOrder(self.search, self.chats)
        self.setTabOrder(self.chats, self.model_picker)
        self.setTabOrder(self.model_picker, self.settings_toggle)
        self.setTabOrder(self.settings_toggle, self.privacy_picker)
        self.setTabOrder(self.privacy_picker, self.system)  # the parameters, when shown, follow the privacy row
        self.setTabOrder(self.system, self.temperature)
        self.setTabOrder(self.temperature, self.top_p)
        self.setTabOrder(self.top_p, self.max_tokens)
        self.setTabOrder(self.max_tokens, self.transcript)
        self.setTabOrder(self.transcript, self.input)
        self.setTabOrder(self.input, self.send_button)
        self.setTabOrder(self.send_button, self.stop_button)
        self.setTabOrder(self.stop_button, self.regenerate_button)
        self._render()

    def focus_first(self) -> None:
        self.input.setFocus()

    def _delete_current(self) -> None:
        item = self.chats.currentItem()
        if item is not None and item.data(Qt.ItemDataRole.UserRole) is not None:
            self.delete_chat(item.data(Qt.ItemDataRole.UserRole))

    # --- the chat list ------------------------------------------------------------------------------
    def refresh_chats(self) -> None:
        query = self.search.text().strip()
        from urllib.parse import quote

        path = f"/api/chats?q={quote(query)}" if query else "/api/chats"
        self.client.call("GET", path, on_ok=self._show_chats)

    def _show_chats(self, chats: list[dict]) -> None:
        hidden = self.pending_delete["chat"]["id"] if self.pending_delete else None
        self.chat_list = [c for c in chats if c["id"] != hidden]
        self.chats.blockSignals(True)
        self.chats.clear()
        for chat in self.chat_list:
            item = QListWidgetItem(chat["title"])
            item.setData(Qt.ItemDataRole.UserRole, chat["id"])
            item.setToolTip(
                chat["title"] + time.strftime("\nUpdated %d %b %Y, %H:%M", time.localtime(chat["updated_at"]))
            )
            self.chats.addItem(item)
            if chat["id"] == self.chat_id:
                self.chats.setCurrentItem(item)
                self.chat = chat
        if not self.chat_list and self.search.text().strip():
            self.chats.addItem(QListWidgetItem("No chat matches"))
            self.chats.item(0).setFlags(Qt.ItemFlag.NoItemFlags)
        self.chats.blockSignals(False)

    def _chat_menu(self, point) -> None:
        item = self.chats.itemAt(point)
        if item is None or item.data(Qt.ItemDataRole.UserRole) is None:
            return
        chat_id = item.data(Qt.ItemDataRole.UserRole)
        menu = QMenu(self)
        menu.addAction("Rename…", lambda: self.rename_chat(chat_id))
        menu.addAction("Export as Markdown…", lambda: self.export_dialog(chat_id, "md"))
        menu.addAction("Export as JSON…", lambda: self.export_dialog(chat_id, "json"))
        menu.addSeparator()
        menu.addAction("Delete", lambda: self.delete_chat(chat_id))
        menu.popup(self.chats.viewport().mapToGlobal(point))

    def new_chat(self, then=None) -> None:
        def created(chat):
            self.chat_id, self.chat = chat["id"], chat
            self.messages = []
            self.info.setText("")
            self._render()
            self.refresh_chats()
            self.input.setFocus()
            if then:
                then()

        self.client.call(
            "POST",
            "/api/chats",
            {
                "title": NEW_TITLE,
                "system_prompt": self.system.text().strip() or None,
                **({"privacy": {"level": self.privacy_level()}} if self.privacy_supported else {}),
            },
            on_ok=created,
            on_error=lambda e: self.info.setText(sentence(f"Could not create a chat: {e}")),
        )

    def _chat_selected(self, item, _previous=None) -> None:
        if item is None or self.stream is not None or item.data(Qt.ItemDataRole.UserRole) is None:
            return
        self.chat_id = item.data(Qt.ItemDataRole.UserRole)
        self.chat = next((c for c in self.chat_list if c["id"] == self.chat_id), None)
        self.client.call("GET", f"/api/chats/{self.chat_id}", on_ok=lambda c: self._load(c))

    def _load(self, chat: dict) -> None:
        if chat["id"] != self.chat_id:
            return  # another chat was picked meanwhile
        self.chat = {k: v for k, v in chat.items() if k != "messages"}
        self.messages = chat["messages"]
        self._show_privacy((chat.get("privacy") or {}).get("level") or self.default_privacy)
        self.info.setText("")  # the last reply's figures belong to the chat it came from
        self._render()

    def node_back(self) -> None:
        """The node answers again: a line saying it did not is stale (an inline error stays with its
        message, with its Retry)."""
        if self.stream is None:
            self.info.setText("")

    def rename_chat(self, chat_id: str | None = None, title: str | None = None) -> None:
        chat_id = chat_id or self.chat_id
        chat = next((c for c in self.chat_list if c["id"] == chat_id), None)
        if chat is None and self.chat is not None and self.chat["id"] == chat_id:
            chat = self.chat  # just created: the list has not been refreshed yet
        if chat is None:
            return
        if title is None:
            title, ok = QInputDialog.getText(self, "Rename chat", "Title", text=chat["title"])
            if not ok:
                return
        title = title.strip()
        if not title:
            self.info.setText("A chat needs a title; the old one is kept.")
            return
        self.client.call(
            "PATCH",
            f"/api/chats/{chat_id}",
            {"title": title[:200]},
            on_ok=lambda _: self.refresh_chats(),
            on_error=lambda e: self.info.setText(sentence(f"Could not rename the chat: {e}")),
        )

    def delete_chat(self, chat_id: str | None = None) -> None:
        """Hide the chat at once; it is deleted for good after a few seconds unless Undo is pressed."""
        chat_id = chat_id or self.chat_id
        chat = next((c for c in self.chat_list if c["id"] == chat_id), None)
        if chat is None:
            return
        self.commit_delete()
        self.pending_delete = {"chat": chat}
        if chat_id == self.chat_id:
            self.chat_id, self.chat, self.messages = None, None, []
            self._render()
        self._show_chats(self.chat_list)
        self.undo_label.setText(f"Deleted “{chat['title']}”.")
        self.undo_bar.show()
        self._delete_timer.start(UNDO_SECONDS * 1000)

    def undo_delete(self) -> None:
        self._delete_timer.stop()
        self.pending_delete = None
        self.undo_bar.hide()
        self.refresh_chats()

    def commit_delete(self):
        """Delete the hidden chat now (the undo time ran out, another chat is deleted, or the app quits).
        Returns the request (the app waits for it when quitting), or None."""
        self._delete_timer.stop()
        pending, self.pending_delete = self.pending_delete, None
        self.undo_bar.hide()
        if pending is not None:
            return self.client.call(
                "DELETE",
                f"/api/chats/{pending['chat']['id']}",
                on_ok=lambda _: self.refresh_chats(),
                on_error=lambda e: self.info.setText(sentence(f"Could not delete the chat: {e}")),
            )

    def export_dialog(self, chat_id: str, kind: str) -> None:
        chat = next((c for c in self.chat_list if c["id"] == chat_id), {"title": "chat"})
        safe = "".join(ch if ch.isalnum() or ch in " -_" else "_" for ch in chat["title"]).strip() or "chat"
        path, _ = QFileDialog.getSaveFileName(
            self,
            "Export chat",
            str(Path.home() / f"{safe}.{kind}"),
            "Markdown (*.md)" if kind == "md" else "JSON (*.json)",
        )
        if path:
            self.export_chat(chat_id, Path(path), kind)

    def export_chat(self, chat_id: str, path: Path, kind: str) -> None:
        def write(chat: dict) -> None:
            messages = chat.pop("messages") or []
            try:
                if kind == "md":
                    path.write_text(chat_markdown(chat, messages), encoding="utf-8")
                else:
                    path.write_text(json.dumps({**chat, "messages": messages}, indent=2, ensure_ascii=False), "utf-8")
            except OSError as exc:
                self.info.setText(sentence(f"Could not export: {exc}"))
                return
            self.info.setText(f"Exported to {path}")

        self.client.call(
            "GET",
            f"/api/chats/{chat_id}",
            on_ok=write,
            on_error=lambda e: self.info.setText(sentence(f"Could not export: {e}")),
        )

    # --- privacy: who may read a chat, who saw its replies --------------------------------------------
    def privacy_level(self) -> str:
        return self.privacy_picker.currentData() or "any"

    def set_default_privacy(self, level: str | None) -> None:
        """The node's default for new chats; shown while no chat (or one without a choice) is open. None:
        the node predates privacy levels (its API would refuse the field), so the picker is hidden."""
        self.privacy_supported = level is not None
        for widget in (self.privacy_label, self.privacy_picker, self.privacy_note):
            widget.setVisible(self.privacy_supported)
        self.default_privacy = level if level in PRIVACY_LABELS else "any"
        if self.chat is None or not self.chat.get("privacy"):
            self._show_privacy(self.default_privacy)

    def _show_privacy(self, level: str) -> None:
        self.privacy_picker.setCurrentIndex(max(0, self.privacy_picker.findData(level)))
        self.privacy_note.setText(PRIVACY_SENTENCES.get(level, ""))

    def _privacy_picked(self, index: int) -> None:
        level = self.privacy_picker.itemData(index)
        self.privacy_note.setText(PRIVACY_SENTENCES.get(level, ""))
        if self.chat_id is None:
            return  # the next new chat takes it
        chat_id, previous = self.chat_id, ((self.chat or {}).get("privacy") or {}).get("level", self.default_privacy)

        def changed(chat: dict) -> None:
            if self.chat is not None and self.chat.get("id") == chat["id"]:
                self.chat["privacy"] = chat.get("privacy")
            self.info.setText(f"From the next reply on: {PRIVACY_LABELS[level].lower()}.")

        def refused(message: str) -> None:
            if self.chat_id == chat_id:
                self._show_privacy(previous)
            self.info.setText(f"Could not change who may read this chat: {message}")

        self.client.call(
            "PATCH", f"/api/chats/{chat_id}", {"privacy": {"level": level}}, on_ok=changed, on_error=refused
        )

    def _show_seen_by(self) -> None:
        """Who received the hidden states of the chat's last reply (kept with each reply by the node)."""
        last = next((m for m in reversed(self.messages) if m.get("role") == "assistant"), None)
        seen = (last or {}).get("seen_by")
        if not seen:
            self.seen_by.setText("")
            return
        own = ((self.node_status or {}).get("contribution") or {}).get("peer_id")
        parts = []
        for server in seen:
            who = "this computer" if server["peer_id"] == own else (server.get("name") or "a server")
            blocks = ", ".join(f"{a}–{b}" for a, b in server["blocks"])
            parts.append(f"{who} (…{server['peer_id'][-6:]}, blocks {blocks})")
        self.seen_by.setText("The last reply's text was seen by: " + "; ".join(parts) + ".")
        self.seen_by.setToolTip("\n".join(server["peer_id"] for server in seen))

    # --- models -------------------------------------------------------------------------------------
    def show_models(self, models: list[dict], own_prefix: str | None) -> None:
        self.model_picker.blockSignals(True)
        self.model_picker.clear()
        own_index = 0
        for model in models:
            covered = sum(1 for n in model["online_per_block"] if n > 0)
            servers = sum(1 for s in model["servers"] if s["state"] == "ONLINE")
            served = f"{covered} of {model['num_blocks']} blocks served, by {plural(servers, 'server')}"
            text = f"{model['dht_prefix']} — {served}"
            if model["dht_prefix"] == own_prefix:
                own_index = self.model_picker.count()
                text += " (this node's model)"
            self.model_picker.addItem(text, model["dht_prefix"])
        if not models:
            self.model_picker.addItem("No model is served in this swarm yet", None)
        self.model_picker.setCurrentIndex(own_index)
        self.model_picker.blockSignals(False)
        self.own_prefix = own_prefix

    def show_unreachable(self, note: str = "The node is not running") -> None:
        self.model_picker.clear()
        self.model_picker.addItem(note, None)
        self.route_text = ""

    def _model_picked(self, index: int) -> None:
        prefix = self.model_picker.itemData(index)
        if prefix and prefix != getattr(self, "own_prefix", None):
            self.info.setText(
                f"The node chats with its own model. To chat with {prefix}, choose it in Settings → Model."
            )

    # --- sending ------------------------------------------------------------------------------------
    def _render(self) -> None:
        self._show_seen_by()
        self.transcript.set_messages(
            self.messages,
            empty_text="Ask anything. Replies come from the swarm's servers, a few blocks of the model each."
            if self.chat_id is None or not self.messages
            else "",
        )

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
        route = f" The last route: {self.route_text}." if self.route_text else ""
        self.info.setText(f"Finding servers…{route}")

    def regenerate(self) -> None:
        """Answer the last message again (sampled unless the temperature is 0)."""
        if self.stream is not None:
            return
        if self.chat_id is None or not any(m["role"] == "user" for m in self.messages):
            self.info.setText("There is no message to answer again yet.")
            return
        # The old answer stays in view until the node confirms the new one (its first event): with the
        # node down, the conversation must not go blank.
        self._replacing = True
        self._begin()
        self.stream = self.client.stream(
            f"/api/chats/{self.chat_id}/regenerate", self._sampling(), self._on_event, self._on_error
        )

    retry = regenerate

    def continue_reply(self) -> None:
        """Write more of the last answer, which stopped at the length limit (LM Studio's Continue)."""
        if self.stream is not None or self.chat_id is None:
            return
        if not self.messages or self.messages[-1]["role"] != "assistant":
            self.info.setText("There is no answer to continue.")
            return
        self.messages[-1].pop("error", None)
        self.messages[-1].pop("error_action", None)
        self._begin()
        last = self.messages[-1]
        self.reply_text = self._continuing = last.get("content") or ""
        last.update(status="streaming", finish_reason=None)
        self._render()
        self.stream = self.client.stream(
            f"/api/chats/{self.chat_id}/continue", self._sampling(), self._on_event, self._on_error
        )

    def send(self) -> None:
        text = self.input.toPlainText().strip()
        if self.stream is not None:
            self.info.setText("A reply is still coming; stop it (Esc) or wait before sending the next message.")
            return
        if not text:
            self.info.setText("Type a message first, then press Enter (Shift+Enter starts a new line).")
            self.input.setFocus()
            return
        if self.chat_id is None:
            self.new_chat(then=self.send)
            return
        self._unsent = text  # back into the box if the node never takes it
        self.input.clear()
        if not any(m["role"] == "user" for m in self.messages) and (self.chat or {}).get("title") == NEW_TITLE:
            self.rename_chat(self.chat_id, auto_title(text))
        self._begin()
        body = {"content": text, **self._sampling()}
        self.stream = self.client.stream(f"/api/chats/{self.chat_id}/messages", body, self._on_event, self._on_error)

    def stop(self) -> None:
        if self.stream is not None:
            self.stream.abort()
            if self.messages and self.messages[-1]["role"] == "assistant":
                self.messages[-1]["status"] = "stopped"
            self.info.setText("Stopped; what arrived is kept.")
            self._finish("stopped")

    def _resume_and_resend(self) -> None:
        """The inline "Resume contributing": resume (or start, if the user said "Not now" at first), say
        so, and ask the question again once this computer serves the model."""
        self._resend_when_online = True
        starting = bool((self.node_status or {}).get("awaiting_consent"))
        self.info.setText(
            f"{'Starting' if starting else 'Resuming'} contributing… the question is asked again once this "
            "computer serves the model."
        )
        self.resume_requested.emit()

    def status_changed(self, status: dict | None) -> None:
        self.node_status = status
        state = ((status or {}).get("contribution") or {}).get("state")
        if self._resend_when_online and state == "online" and self.stream is None:
            self._resend_when_online = False
            self.info.setText("Contributing again; asking the question again…")
            self.retry()
        elif self._resend_when_online and state in ("stopped", "failed") and not (status or {}).get("awaiting_consent"):
            self._resend_when_online = False
            self.info.setText("Contributing did not resume; see the Contribute tab.")

    def _paused(self) -> bool:
        c = (self.node_status or {}).get("contribution") or {}
        return c.get("state") == "paused" or bool((self.node_status or {}).get("awaiting_consent"))

    def _on_event(self, kind: str, data: dict) -> None:
        if kind == "message":
            if self._replacing and data["message"]["role"] == "assistant":
                while self.messages and self.messages[-1]["role"] != "user":
                    self.messages.pop()  # the node has deleted the answer it is replacing
            self._replacing = False
            if data["message"]["role"] == "user":
                self._unsent = None
            self.messages.append(data["message"])
            self._render()
            return
        if kind == "token":
            self.reply_text += data["text"]
            self.pieces += 1
            self.messages[-1]["content"] = self.reply_text
            elapsed = max(time.perf_counter() - self.started, 1e-6)
            self.info.setText(f"Writing… {self.pieces} tokens, {self.pieces / elapsed:.1f} tokens/s")
            self.transcript.update_last()
            return
        if kind == "done":
            finish = data.get("finish_reason")
            self.messages[-1].update(
                content=data["text"], status=data["status"], finish_reason=finish, seen_by=data.get("seen_by")
            )
            self._show_seen_by()
            ending = {
                "length": f" It stopped at the length limit ({self.max_tokens.value()} tokens): Continue writes more.",
                "stop": " The model finished its answer.",
            }.get(finish, "")
            self.info.setText(
                f"{data['tokens']} tokens in {time.perf_counter() - self.started:.1f} s, "
                f"{data['tokens_per_second']:.1f} tokens/s.{ending}"
            )
            self._finish(data["status"])
            self.reply_finished.emit(data)
            return
        if kind == "error":
            self._show_failure(data.get("kind"), data.get("message") or "the reply failed")

    def _show_failure(self, kind: str | None, message: str) -> None:
        if self._unsent is not None:  # the question never reached the node: nothing to retry; keep it
            if not self.input.toPlainText().strip():
                self.input.setPlainText(self._unsent)
            self._unsent = None
            self.info.setText(f"Not sent: {message}. Your message is back in the box to send again.")
            self._finish("failed")
            return
        if self._continuing is not None and self.messages:
            # Continue failed: the answer is what it was (or longer, if some arrived), and the way on is
            # to continue again, never Retry (which would answer the question anew).
            target = self.messages[-1]
            unchanged = (target.get("content") or "") == self._continuing
            target.update(status="complete" if unchanged else "failed", finish_reason="length" if unchanged else None)
            target["error"] = f"Could not continue: {message}."
            target["error_action"] = "continue"
            self.info.setText(target["error"])
            self._finish("failed")
            return
        if self.messages and self.messages[-1]["role"] == "assistant":
            target = self.messages[-1]
            if not self._replacing:  # an answer the node never began to replace keeps its own status
                target["status"] = "failed"
        else:
            target = {"role": "assistant", "content": "", "created_at": time.time(), "status": "failed"}
            self.messages.append(target)
        if kind == "no_swarm" and (self.node_status or {}).get("awaiting_consent"):
            target["error"] = "This computer has not started contributing yet, so no server in this swarm can answer."
            target["error_action"] = "start"
        elif kind == "no_swarm" and self._paused():
            target["error"] = "Contribution is paused, so no server in this private swarm can answer."
            target["error_action"] = "resume"
        elif kind == "no_swarm":
            target["error"] = (
                "Nobody serves this model yet. Start contributing on the Contribute tab, or join a swarm in Settings."
            )
            target["error_action"] = "retry"
        else:
            target["error"] = f"The reply failed: {message}."
            target["error_action"] = "retry"
        self.info.setText(target["error"])
        self._finish("failed")

    def _on_error(self, message: str) -> None:
        self._show_failure("stream", f"{message}. What arrived is kept" if self.reply_text else message)

    def _finish(self, status: str) -> None:
        self.stream = None
        self._replacing = False
        self._continuing = None
        self.send_button.setEnabled(True)
        self.regenerate_button.setEnabled(True)
        self.stop_button.setEnabled(False)
        self.transcript.messages = self.messages
        self.transcript.flush()
