"""The Chat pane's conversations: list and search, new, open, rename, delete with undo, export."""

from __future__ import annotations

import json
import time
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QFileDialog, QInputDialog, QListWidgetItem, QMenu

from corolla.api import routes
from corolla.api.models import ActionResult, Chat, ChatCreate, ChatUpdate
from corolla.gui.turns import turns_of
from corolla.gui.widgets import sentence

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


def chat_markdown(chat: Chat) -> str:
    lines = [f"# {chat.title}", ""]
    if chat.model:
        lines += [f"_Model: {chat.model}_", ""]
    if chat.system_prompt:
        lines += ["**System:** " + chat.system_prompt, ""]
    for m in chat.messages or []:
        who = "You" if m.role == "user" else "Assistant"
        note = "" if m.status == "complete" else f" ({m.status})"
        lines += [f"## {who}{note}", "", m.content, ""]
    return "\n".join(lines)


class ChatList:
    """The conversations' actions of the Chat pane (a QWidget subclass mixes this in)."""

    def _delete_current(self) -> None:
        item = self.chats.currentItem()
        if item is not None and item.data(Qt.ItemDataRole.UserRole) is not None:
            self.delete_chat(item.data(Qt.ItemDataRole.UserRole))

    def refresh_chats(self) -> None:
        query = self.search.text().strip()

        path = routes.chats(query) if query else routes.CHATS
        self.client.call("GET", path, on_ok=self._show_chats, answer=list[Chat])

    def _show_chats(self, chats: list[Chat]) -> None:
        hidden = self.pending_delete.id if self.pending_delete else None
        self.chat_list = [c for c in chats if c.id != hidden]
        self.chats.blockSignals(True)
        self.chats.clear()
        for chat in self.chat_list:
            item = QListWidgetItem(chat.title)
            item.setData(Qt.ItemDataRole.UserRole, chat.id)
            item.setToolTip(chat.title + time.strftime("\nUpdated %d %b %Y, %H:%M", time.localtime(chat.updated_at)))
            self.chats.addItem(item)
            if chat.id == self.chat_id:
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
        def created(chat: Chat) -> None:
            self.chat_id, self.chat = chat.id, chat
            self.messages = []
            self.info.setText("")
            self._render()
            self.refresh_chats()
            self.input.setFocus()
            if then:
                then()

        self.client.call(
            "POST",
            routes.CHATS,
            {
                "title": NEW_TITLE,
                "system_prompt": self.system.text().strip() or None,
                **({"privacy": {"level": self.privacy_level()}} if self.privacy_supported else {}),
            },
            on_ok=created,
            on_error=lambda e: self.info.setText(sentence(f"Could not create a chat: {e}")),
            answer=Chat,
            request=ChatCreate,
        )

    def _chat_selected(self, item, _previous=None) -> None:
        if item is None or self.stream is not None or item.data(Qt.ItemDataRole.UserRole) is None:
            return
        self.chat_id = item.data(Qt.ItemDataRole.UserRole)
        self.chat = next((c for c in self.chat_list if c.id == self.chat_id), None)
        self.client.call("GET", routes.chat(self.chat_id), on_ok=lambda c: self._load(c), answer=Chat)

    def _load(self, chat: Chat) -> None:
        if chat.id != self.chat_id:
            return  # another chat was picked meanwhile
        self.messages = turns_of(chat)
        self.chat = chat.model_copy(update={"messages": None})
        self._show_privacy(chat.privacy.level if chat.privacy else self.default_privacy)
        self.info.setText("")  # the last reply's figures belong to the chat it came from
        self._render()

    def rename_chat(self, chat_id: str | None = None, title: str | None = None) -> None:
        chat_id = chat_id or self.chat_id
        chat = next((c for c in self.chat_list if c.id == chat_id), None)
        if chat is None and self.chat is not None and self.chat.id == chat_id:
            chat = self.chat  # just created: the list has not been refreshed yet
        if chat is None:
            return
        if title is None:
            title, ok = QInputDialog.getText(self, "Rename chat", "Title", text=chat.title)
            if not ok:
                return
        title = title.strip()
        if not title:
            self.info.setText("A chat needs a title; the old one is kept.")
            return
        self.client.call(
            "PATCH",
            routes.chat(chat_id),
            {"title": title[:200]},
            on_ok=lambda _: self.refresh_chats(),
            on_error=lambda e: self.info.setText(sentence(f"Could not rename the chat: {e}")),
            answer=Chat,
            request=ChatUpdate,
        )

    def delete_chat(self, chat_id: str | None = None) -> None:
        """Hide the chat at once; it is deleted for good after a few seconds unless Undo is pressed."""
        chat_id = chat_id or self.chat_id
        chat = next((c for c in self.chat_list if c.id == chat_id), None)
        if chat is None:
            return
        self.commit_delete()
        self.pending_delete = chat
        if chat_id == self.chat_id:
            self.chat_id, self.chat, self.messages = None, None, []
            self._render()
        self._show_chats(self.chat_list)
        self.undo_label.setText(f"Deleted “{chat.title}”.")
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
                routes.chat(pending.id),
                on_ok=lambda _: self.refresh_chats(),
                on_error=lambda e: self.info.setText(sentence(f"Could not delete the chat: {e}")),
                answer=ActionResult,
            )

    def export_dialog(self, chat_id: str, kind: str) -> None:
        title = next((c.title for c in self.chat_list if c.id == chat_id), "chat")
        safe = "".join(ch if ch.isalnum() or ch in " -_" else "_" for ch in title).strip() or "chat"
        path, _ = QFileDialog.getSaveFileName(
            self,
            "Export chat",
            str(Path.home() / f"{safe}.{kind}"),
            "Markdown (*.md)" if kind == "md" else "JSON (*.json)",
        )
        if path:
            self.export_chat(chat_id, Path(path), kind)

    def export_chat(self, chat_id: str, path: Path, kind: str) -> None:
        def write(chat: Chat) -> None:
            try:
                if kind == "md":
                    path.write_text(chat_markdown(chat), encoding="utf-8")
                else:
                    exported = chat.model_dump(mode="json")
                    exported["messages"] = exported["messages"] or []
                    path.write_text(json.dumps(exported, indent=2, ensure_ascii=False), "utf-8")
            except OSError as exc:
                self.info.setText(sentence(f"Could not export: {exc}"))
                return
            self.info.setText(f"Exported to {path}")

        self.client.call(
            "GET",
            routes.chat(chat_id),
            on_ok=write,
            on_error=lambda e: self.info.setText(sentence(f"Could not export: {e}")),
            answer=Chat,
        )
