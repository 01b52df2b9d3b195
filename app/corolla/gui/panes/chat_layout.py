"""The Chat pane's widgets: built once, named as the pane's attributes (the pane's behaviour lives in
chat.py, chat_list.py and chat_reply.py)."""

from __future__ import annotations

from PySide6.QtCore import QSettings, Qt, QTimer, Signal
from PySide6.QtGui import QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from corolla.api.models import MAX_NEW_TOKENS, PRIVACY_LABELS, PRIVACY_SENTENCES
from corolla.gui.prefs import read_float, read_int
from corolla.gui.transcript import Transcript
from corolla.gui.widgets import plain_label


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


class ChatLayout:
    """Builds the Chat pane's widgets (a QWidget subclass mixes this in)."""

    def _build(self, prefs: QSettings) -> None:
        outer = QHBoxLayout(self)
        outer.setContentsMargins(6, 6, 6, 6)
        self.splitter = QSplitter(Qt.Orientation.Horizontal)
        self.splitter.setObjectName("chatSplitter")
        outer.addWidget(self.splitter)
        self._build_side()
        main = QWidget()
        main_layout = QVBoxLayout(main)
        main_layout.setContentsMargins(0, 0, 0, 0)
        self._build_top(main_layout)
        self._build_parameters(main_layout, prefs)
        self._build_transcript(main_layout)
        self._build_entry(main_layout)
        self.splitter.addWidget(main)
        self.splitter.setStretchFactor(0, 1)
        self.splitter.setStretchFactor(1, 4)
        self.splitter.setSizes([240, 760])
        state = prefs.value("chat/splitter")
        if state is not None:
            self.splitter.restoreState(state)
        self.splitter.splitterMoved.connect(lambda *_: prefs.setValue("chat/splitter", self.splitter.saveState()))
        self._shortcuts_and_tab_order()

    def _build_side(self) -> None:
        """The conversations: New chat, search, the list and the undo bar of a deletion."""
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

    def _build_top(self, main_layout: QVBoxLayout) -> None:
        """The model picker, the Parameters toggle and who may read the chat."""
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

    def _build_parameters(self, main_layout: QVBoxLayout, prefs: QSettings) -> None:
        """The sampling parameters, remembered in the preferences."""
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

    def _build_transcript(self, main_layout: QVBoxLayout) -> None:
        """The transcript, the status line and who saw the last reply."""
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

    def _build_entry(self, main_layout: QVBoxLayout) -> None:
        """The message box and its buttons."""
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

    def _shortcuts_and_tab_order(self) -> None:
        """Esc stops a reply, Del deletes the picked chat; Tab goes top to bottom."""
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
