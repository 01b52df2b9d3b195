"""The node's SQLite database (WAL): chats and messages, hourly contribution stats, settings.

Replies are written through as they stream, so a node killed mid-reply keeps every streamed token;
at the next start, replies left `streaming` are marked `interrupted`.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS chats (
    id TEXT PRIMARY KEY, title TEXT NOT NULL, model TEXT, system_prompt TEXT,
    created_at REAL NOT NULL, updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY, chat_id TEXT NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
    role TEXT NOT NULL, content TEXT NOT NULL, status TEXT NOT NULL DEFAULT 'complete',
    tokens INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, seq INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_chat ON messages(chat_id, seq);
CREATE TABLE IF NOT EXISTS contribution_hourly (
    hour INTEGER PRIMARY KEY, tokens_served INTEGER NOT NULL DEFAULT 0, sessions INTEGER NOT NULL DEFAULT 0,
    inference_steps INTEGER NOT NULL DEFAULT 0, uptime_s REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS flagged_servers (
    peer_id TEXT PRIMARY KEY, dht_prefix TEXT, evidence TEXT NOT NULL, flagged_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS slow_servers (
    peer_id TEXT PRIMARY KEY, dht_prefix TEXT, evidence TEXT NOT NULL, noted_at REAL NOT NULL
);
"""
SLOW_MEMORY_S = 24 * 3600  # a server found slow is remembered this long (it may have been busy that day)
# Columns added after the first release: (table, column, declaration), added to older databases on open.
# chats.privacy: the chat's privacy choice (JSON {"level", "peers"}; NULL: the node's default).
# messages.seen_by: a reply's recipients, the servers that received its hidden states (JSON list).
# messages.finish_reason: why a complete reply ended ("stop" or "length").
ADDED_COLUMNS = [("chats", "privacy", "TEXT"), ("messages", "seen_by", "TEXT"), ("messages", "finish_reason", "TEXT")]


class Database:
    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.executescript(SCHEMA)
        self._add_columns()
        self.interrupted_on_start = self._mark_interrupted()

    def _execute(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._conn.execute(sql, args)

    def _add_columns(self) -> None:
        for table, column, declaration in ADDED_COLUMNS:
            present = {row["name"] for row in self._conn.execute(f"PRAGMA table_info({table})")}
            if column not in present:
                self._conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

    def _mark_interrupted(self) -> int:
        return self._execute("UPDATE messages SET status='interrupted' WHERE status='streaming'").rowcount

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # --- chats -----------------------------------------------------------------------------------
    def create_chat(
        self, title: str, model: str | None, system_prompt: str | None, privacy: dict | None = None
    ) -> dict:
        now, chat_id = time.time(), uuid.uuid4().hex
        self._execute(
            "INSERT INTO chats (id, title, model, system_prompt, created_at, updated_at, privacy) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (chat_id, title, model, system_prompt, now, now, None if privacy is None else json.dumps(privacy)),
        )
        return self.get_chat(chat_id)

    def get_chat(self, chat_id: str) -> dict | None:
        row = self._execute("SELECT * FROM chats WHERE id=?", (chat_id,)).fetchone()
        return _chat_row(row) if row else None

    def list_chats(self) -> list[dict]:
        return [_chat_row(r) for r in self._execute("SELECT * FROM chats ORDER BY updated_at DESC")]

    def set_chat_privacy(self, chat_id: str, privacy: dict | None) -> bool:
        value = None if privacy is None else json.dumps(privacy)
        return self._execute("UPDATE chats SET privacy=? WHERE id=?", (value, chat_id)).rowcount > 0

    def rename_chat(self, chat_id: str, title: str) -> bool:
        return self._execute("UPDATE chats SET title=? WHERE id=?", (title, chat_id)).rowcount > 0

    def search_chats(self, query: str) -> list[dict]:
        """Chats whose title or any message contains `query` (case-insensitive), newest first."""
        pattern = "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        sql = (
            "SELECT * FROM chats WHERE title LIKE ? ESCAPE '\\' OR id IN "
            "(SELECT chat_id FROM messages WHERE content LIKE ? ESCAPE '\\') ORDER BY updated_at DESC"
        )
        return [_chat_row(r) for r in self._execute(sql, (pattern, pattern))]

    def delete_chat(self, chat_id: str) -> bool:
        return self._execute("DELETE FROM chats WHERE id=?", (chat_id,)).rowcount > 0

    def messages(self, chat_id: str) -> list[dict]:
        rows = self._execute("SELECT * FROM messages WHERE chat_id=? ORDER BY seq", (chat_id,))
        return [_message_row(r) for r in rows]

    def set_seen_by(self, message_id: str, seen_by: list[dict]) -> None:
        """Keep with a reply the servers that received its hidden states."""
        self._execute("UPDATE messages SET seen_by=? WHERE id=?", (json.dumps(seen_by), message_id))

    def add_message(self, chat_id: str, role: str, content: str, status: str = "complete") -> dict:
        now, message_id = time.time(), uuid.uuid4().hex
        with self._lock:
            seq = self._conn.execute(
                "SELECT COALESCE(MAX(seq), 0) + 1 FROM messages WHERE chat_id=?", (chat_id,)
            ).fetchone()[0]
            self._conn.execute(
                "INSERT INTO messages (id, chat_id, role, content, status, tokens, created_at, seq) "
                "VALUES (?, ?, ?, ?, ?, 0, ?, ?)",
                (message_id, chat_id, role, content, status, now, seq),
            )
            self._conn.execute("UPDATE chats SET updated_at=? WHERE id=?", (now, chat_id))
        return {
            "id": message_id,
            "chat_id": chat_id,
            "role": role,
            "content": content,
            "status": status,
            "tokens": 0,
            "created_at": now,
            "seq": seq,
            "seen_by": None,
            "finish_reason": None,
        }

    def delete_messages_after(self, chat_id: str, seq: int) -> int:
        return self._execute("DELETE FROM messages WHERE chat_id=? AND seq>?", (chat_id, seq)).rowcount

    def update_message(
        self, message_id: str, content: str, tokens: int, status: str, finish_reason: str | None = None
    ) -> None:
        """`finish_reason` (a finished reply): "stop" (the model ended it) or "length" (the token limit)."""
        self._execute(
            "UPDATE messages SET content=?, tokens=?, status=?, finish_reason=? WHERE id=?",
            (content, tokens, status, finish_reason, message_id),
        )

    def append_to_message(self, message_id: str, piece: str, tokens: int) -> None:
        """A streamed piece added to the end of a reply (its status stays `streaming`)."""
        self._execute("UPDATE messages SET content=content||?, tokens=? WHERE id=?", (piece, tokens, message_id))

    # --- contribution stats ------------------------------------------------------------------------
    def add_contribution(self, hour: int, tokens: int, sessions: int, steps: int, uptime_s: float) -> None:
        self._execute(
            "INSERT INTO contribution_hourly VALUES (?, ?, ?, ?, ?) ON CONFLICT(hour) DO UPDATE SET "
            "tokens_served=tokens_served+excluded.tokens_served, sessions=sessions+excluded.sessions, "
            "inference_steps=inference_steps+excluded.inference_steps, uptime_s=uptime_s+excluded.uptime_s",
            (hour, tokens, sessions, steps, uptime_s),
        )

    def contribution_history(self, since_hour: int) -> list[dict]:
        return [
            dict(r)
            for r in self._execute("SELECT * FROM contribution_hourly WHERE hour>=? ORDER BY hour", (since_hour,))
        ]

    def contribution_totals(self) -> dict:
        row = self._execute(
            "SELECT COALESCE(SUM(tokens_served), 0), COALESCE(SUM(sessions), 0), COALESCE(SUM(uptime_s), 0), "
            "MIN(hour) FROM contribution_hourly"
        ).fetchone()
        return {
            "tokens_served": int(row[0]),
            "sessions": int(row[1]),
            "uptime_s": float(row[2]),
            "since": None if row[3] is None else float(row[3]) * 3600,
        }

    # --- servers caught returning wrong results (swarm/client/verification.py) ----------------------
    def flag_server(self, evidence: dict[str, Any]) -> None:
        self._execute(
            "INSERT INTO flagged_servers VALUES (?, ?, ?, ?) ON CONFLICT(peer_id) DO UPDATE SET "
            "evidence=excluded.evidence, flagged_at=excluded.flagged_at",
            (evidence["peer_id"], evidence.get("dht_prefix"), json.dumps(evidence), time.time()),
        )

    def flagged_servers(self) -> dict[str, dict[str, Any]]:
        """peer id -> the evidence recorded when it was flagged."""
        rows = self._execute("SELECT peer_id, evidence FROM flagged_servers ORDER BY flagged_at")
        return {r["peer_id"]: json.loads(r["evidence"]) for r in rows}

    # --- servers found slower than they announce (swarm/client/speed.py) ---------------------------
    def note_slow_server(self, evidence: dict[str, Any]) -> None:
        self._execute(
            "INSERT INTO slow_servers VALUES (?, ?, ?, ?) ON CONFLICT(peer_id) DO UPDATE SET "
            "evidence=excluded.evidence, noted_at=excluded.noted_at",
            (evidence["peer_id"], evidence.get("dht_prefix"), json.dumps(evidence), time.time()),
        )

    def slow_servers(self) -> dict[str, dict[str, Any]]:
        """peer id -> the evidence of its latest slowness, for those noted within SLOW_MEMORY_S."""
        rows = self._execute(
            "SELECT peer_id, evidence FROM slow_servers WHERE noted_at >= ? ORDER BY noted_at",
            (time.time() - SLOW_MEMORY_S,),
        )
        return {r["peer_id"]: json.loads(r["evidence"]) for r in rows}

    # --- settings ----------------------------------------------------------------------------------
    def load_settings(self) -> dict[str, Any]:
        return {r["key"]: json.loads(r["value"]) for r in self._execute("SELECT key, value FROM settings")}

    def save_settings(self, values: dict[str, Any]) -> None:
        with self._lock:
            self._conn.execute("BEGIN")
            for key, value in values.items():
                self._conn.execute(
                    "INSERT INTO settings VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                    (key, json.dumps(value)),
                )
            self._conn.execute("COMMIT")


def _chat_row(row: sqlite3.Row) -> dict:
    chat = dict(row)
    chat["privacy"] = json.loads(chat["privacy"]) if chat.get("privacy") else None
    return chat


def _message_row(row: sqlite3.Row) -> dict:
    message = dict(row)
    message["seen_by"] = json.loads(message["seen_by"]) if message.get("seen_by") else None
    return message
