"""The Chat pane's replies: send, regenerate, continue and stop, and the streamed reply's events."""

from __future__ import annotations

import time

from corolla.api import events as ev
from corolla.api import routes
from corolla.api.models import Continue, NodeStatus, Regenerate, SendMessage
from corolla.gui.panes.chat_list import NEW_TITLE, auto_title
from corolla.gui.turns import Turn


class ChatReply:
    """Asking and answering in the Chat pane (a QWidget subclass mixes this in)."""

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
        if self.chat_id is None or not any(m.role == "user" for m in self.messages):
            self.info.setText("There is no message to answer again yet.")
            return
        # The old answer stays in view until the node confirms the new one (its first event): with the
        # node down, the conversation must not go blank.
        self._replacing = True
        self._begin()
        self.stream = self.client.stream(
            routes.chat_regenerate(self.chat_id), self._sampling(), self._on_event, self._on_error, Regenerate
        )

    retry = regenerate

    def continue_reply(self) -> None:
        """Write more of the last answer, which stopped at the length limit (LM Studio's Continue)."""
        if self.stream is not None or self.chat_id is None:
            return
        if not self.messages or self.messages[-1].role != "assistant":
            self.info.setText("There is no answer to continue.")
            return
        self._begin()
        last = self.messages[-1]
        self.reply_text = self._continuing = last.content
        last.error = last.error_action = last.finish_reason = None
        last.status = "streaming"
        self._render()
        self.stream = self.client.stream(
            routes.chat_continue(self.chat_id), self._sampling(), self._on_event, self._on_error, Continue
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
        if not any(m.role == "user" for m in self.messages) and self.chat is not None and self.chat.title == NEW_TITLE:
            self.rename_chat(self.chat_id, auto_title(text))
        self._begin()
        body = {"content": text, **self._sampling()}
        path = routes.chat_messages(self.chat_id)
        self.stream = self.client.stream(path, body, self._on_event, self._on_error, SendMessage)

    def stop(self) -> None:
        if self.stream is not None:
            self.stream.abort()
            if self.messages and self.messages[-1].role == "assistant":
                self.messages[-1].status = "stopped"
            self.info.setText("Stopped; what arrived is kept.")
            self._finish("stopped")

    def _resume_and_resend(self) -> None:
        """The inline "Resume contributing": resume (or start, if the user said "Not now" at first), say
        so, and ask the question again once this computer serves the model."""
        self._resend_when_online = True
        starting = self.node_status is not None and self.node_status.awaiting_consent
        self.info.setText(
            f"{'Starting' if starting else 'Resuming'} contributing… the question is asked again once this "
            "computer serves the model."
        )
        self.resume_requested.emit()

    def status_changed(self, status: NodeStatus | None) -> None:
        self.node_status = status
        state = status.contribution.state if status is not None else None
        if self._resend_when_online and state == "online" and self.stream is None:
            self._resend_when_online = False
            self.info.setText("Contributing again; asking the question again…")
            self.retry()
        elif self._resend_when_online and state in ("stopped", "failed") and not status.awaiting_consent:
            self._resend_when_online = False
            self.info.setText("Contributing did not resume; see the Contribute tab.")

    def _paused(self) -> bool:
        status = self.node_status
        return status is not None and (status.contribution.state == "paused" or status.awaiting_consent)

    def _on_event(self, kind: str, data: dict) -> None:
        event = ev.reply_event(kind, data)
        if isinstance(event, ev.MessageSaved):
            message = Turn.of(event.message)
            if self._replacing and message.role == "assistant":
                while self.messages and self.messages[-1].role != "user":
                    self.messages.pop()  # the node has deleted the answer it is replacing
            self._replacing = False
            if message.role == "user":
                self._unsent = None
            self.messages.append(message)
            self._render()
        elif isinstance(event, ev.TokenPiece):
            self.reply_text += event.text
            self.pieces += 1
            self.messages[-1].content = self.reply_text
            elapsed = max(time.perf_counter() - self.started, 1e-6)
            self.info.setText(f"Writing… {self.pieces} tokens, {self.pieces / elapsed:.1f} tokens/s")
            self.transcript.update_last()
        elif isinstance(event, ev.ReplyDone):
            last = self.messages[-1]
            last.content, last.status, last.finish_reason = event.text, event.status, event.finish_reason
            last.seen_by = event.seen_by
            self._show_seen_by()
            ending = {
                "length": f" It stopped at the length limit ({self.max_tokens.value()} tokens): Continue writes more.",
                "stop": " The model finished its answer.",
            }.get(event.finish_reason, "")
            self.info.setText(
                f"{event.tokens} tokens in {time.perf_counter() - self.started:.1f} s, "
                f"{event.tokens_per_second:.1f} tokens/s.{ending}"
            )
            self._finish(event.status)
            self.reply_finished.emit(event)
        elif isinstance(event, ev.ReplyFailed):
            self._show_failure(event.kind, event.message or "the reply failed")

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
            unchanged = target.content == self._continuing
            target.status, target.finish_reason = ("complete", "length") if unchanged else ("failed", None)
            target.error, target.error_action = f"Could not continue: {message}.", "continue"
            self.info.setText(target.error)
            self._finish("failed")
            return
        if self.messages and self.messages[-1].role == "assistant":
            target = self.messages[-1]
            if not self._replacing:  # an answer the node never began to replace keeps its own status
                target.status = "failed"
        else:
            target = Turn.failed()
            self.messages.append(target)
        if kind == "no_swarm" and self.node_status is not None and self.node_status.awaiting_consent:
            target.error = "This computer has not started contributing yet, so no server in this swarm can answer."
            target.error_action = "start"
        elif kind == "no_swarm" and self._paused():
            target.error = "Contribution is paused, so no server in this private swarm can answer."
            target.error_action = "resume"
        elif kind == "no_swarm":
            target.error = (
                "Nobody serves this model yet. Start contributing on the Contribute tab, or join a swarm in Settings."
            )
            target.error_action = "retry"
        else:
            target.error = f"The reply failed: {message}."
            target.error_action = "retry"
        self.info.setText(target.error)
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
