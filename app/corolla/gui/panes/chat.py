"""Chat: conversations on the left (search, rename, delete with undo, export), the transcript with
Markdown, a status line, and the message box (Enter sends, Shift+Enter starts a new line, Esc stops).

- chat.py (here): the pane, its state, privacy, models and the transcript's rendering.
- chat_layout.py: its widgets; chat_list.py: the conversations; chat_reply.py: asking and answering.
"""

from __future__ import annotations

from PySide6.QtCore import QSettings, Signal
from PySide6.QtWidgets import QWidget

from corolla.api import models as m
from corolla.api import routes
from corolla.api.models import MAX_NEW_TOKENS, PRIVACY_LABELS, PRIVACY_SENTENCES
from corolla.gui.node_client import NodeClient
from corolla.gui.panes.chat_layout import ChatLayout, MessageBox
from corolla.gui.panes.chat_list import NEW_TITLE, ChatList, auto_title, chat_markdown
from corolla.gui.panes.chat_reply import ChatReply
from corolla.gui.turns import Turn
from corolla.gui.widgets import block_ranges, plural

__all__ = ["MAX_NEW_TOKENS", "NEW_TITLE", "ChatPane", "MessageBox", "auto_title", "chat_markdown"]


class ChatPane(ChatLayout, ChatList, ChatReply, QWidget):
    reply_finished = Signal(object)  # the ReplyDone event of a reply
    resume_requested = Signal()

    def __init__(self, client: NodeClient, prefs: QSettings, parent: QWidget | None = None):
        super().__init__(parent)
        self.client, self.prefs = client, prefs
        self.chat_id: str | None = None
        self.chat: m.Chat | None = None  # without its messages (those are self.messages)
        self.chat_list: list[m.Chat] = []
        self.stream = None
        self.reply_text = ""
        self.started = 0.0
        self.pieces = 0
        self.messages: list[Turn] = []
        self.node_status: m.NodeStatus | None = None
        self.route_text = ""
        self.pending_delete: m.Chat | None = None  # hidden, deleted when the undo time runs out
        self._replacing = False  # a regenerate: the answers after the last question go when the node says
        self._unsent: str | None = None  # a message sent but not yet confirmed by the node
        self._resend_when_online = False  # "Resume contributing" was pressed: ask again once online
        self._continuing: str | None = None  # Continue: the answer as it was before, until the node is done
        self.default_privacy = "any"  # the node's default_privacy setting (the window sets it)
        self.privacy_supported = True
        self._build(prefs)
        self._render()

    def focus_first(self) -> None:
        self.input.setFocus()

    def node_back(self) -> None:
        """The node answers again: a line saying it did not is stale (an inline error stays with its
        message, with its Retry)."""
        if self.stream is None:
            self.info.setText("")

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
        if self.chat is None or not self.chat.privacy:
            self._show_privacy(self.default_privacy)

    def _show_privacy(self, level: str) -> None:
        self.privacy_picker.setCurrentIndex(max(0, self.privacy_picker.findData(level)))
        self.privacy_note.setText(PRIVACY_SENTENCES.get(level, ""))

    def _privacy_picked(self, index: int) -> None:
        level = self.privacy_picker.itemData(index)
        self.privacy_note.setText(PRIVACY_SENTENCES.get(level, ""))
        if self.chat_id is None:
            return  # the next new chat takes it
        chosen = self.chat.privacy if self.chat is not None else None
        chat_id, previous = self.chat_id, chosen.level if chosen is not None else self.default_privacy

        def changed(chat: m.Chat) -> None:
            if self.chat is not None and self.chat.id == chat.id:
                self.chat.privacy = chat.privacy
            self.info.setText(f"From the next reply on: {PRIVACY_LABELS[level].lower()}.")

        def refused(message: str) -> None:
            if self.chat_id == chat_id:
                self._show_privacy(previous)
            self.info.setText(f"Could not change who may read this chat: {message}")

        body = {"privacy": {"level": level}}
        self.client.call("PATCH", routes.chat(chat_id), body, changed, refused, answer=m.Chat, request=m.ChatUpdate)

    def _show_seen_by(self) -> None:
        """Who received the hidden states of the chat's last reply (kept with each reply by the node)."""
        last = next((m for m in reversed(self.messages) if m.role == "assistant"), None)
        seen = last.seen_by if last is not None else None
        if not seen:
            self.seen_by.setText("")
            return
        own = self.node_status.contribution.peer_id if self.node_status is not None else None
        parts = []
        for server in seen:
            who = "this computer" if server.peer_id == own else (server.name or "a server")
            # Spans arrive end-exclusive; people count blocks as the strip does: [0, 30) is "blocks 0–29".
            held = [block for a, b in server.blocks for block in range(a, b)]
            word = "block" if len(held) == 1 else "blocks"
            parts.append(f"{who} (…{server.peer_id[-6:]}, {word} {block_ranges(held)})")
        self.seen_by.setText("The last reply's text was seen by: " + "; ".join(parts) + ".")
        self.seen_by.setToolTip("\n".join(server.peer_id for server in seen))

    # --- models -------------------------------------------------------------------------------------
    def show_models(self, models: list[m.SwarmModel], own_prefix: str | None, own_name: str | None = None) -> None:
        self.model_picker.blockSignals(True)
        self.model_picker.clear()
        self.model_picker.setToolTip("")  # a failed read's reason, no longer current
        own_index = 0
        for model in models:
            covered = sum(1 for n in model.online_per_block if n > 0)
            servers = sum(1 for s in model.servers if s.state == "ONLINE")
            served = f"{covered} of {model.num_blocks} blocks served, by {plural(servers, 'server')}"
            own = model.dht_prefix == own_prefix
            text = f"{own_name if own and own_name else model.dht_prefix} — {served}"
            if own:
                own_index = self.model_picker.count()
                text += " (this node's model)"
            self.model_picker.addItem(text, model.dht_prefix)
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
