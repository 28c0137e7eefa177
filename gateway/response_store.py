"""Stored Responses (`store: true`) in an embedded SQLite database.

One row per response: its id, creation and expiry times, the conversation that led to it (the
chat messages its input became, previous responses included) and the response object. A
`previous_response_id` continues from the stored conversation plus that response's output.

- WAL journal and `synchronous=NORMAL`: a kill -9 mid-write loses at most the last commits,
  never the file (SQLite's guarantee).
- The schema carries a version (`PRAGMA user_version`); `open()` migrates older files forward.
- Expired rows are invisible at once and deleted by `purge_expired()` (run at start-up and on
  every write).
- SQLite calls run on a worker thread (`asyncio.to_thread`), never on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
_MIGRATIONS: dict[int, str] = {
    # version -> the SQL that brings a file at version - 1 to it
    1: """
        CREATE TABLE responses (
            id TEXT PRIMARY KEY,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            messages TEXT NOT NULL,   -- JSON: the chat messages the input became (history included)
            input_items TEXT NOT NULL, -- JSON: the request's own input items, as sent
            response TEXT NOT NULL    -- JSON: the response object
        );
        CREATE INDEX responses_expiry ON responses (expires_at);
    """,
}


@dataclass(frozen=True)
class StoredResponse:
    id: str
    messages: list[dict[str, Any]]
    input_items: list[dict[str, Any]]
    response: dict[str, Any]


class ResponseStore:
    def __init__(self, path: str, ttl_s: float) -> None:
        self.path = path
        self.ttl_s = ttl_s
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # one connection, used from worker threads one at a time

    # ---- lifecycle ---------------------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        return self._db is not None

    def open_sync(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path} has schema version {version}, newer than this gateway's {SCHEMA_VERSION}"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            db.execute("BEGIN")
            for statement in _statements(target):
                db.execute(statement)
            db.execute(f"PRAGMA user_version={target}")
            db.execute("COMMIT")
        self._db = db
        self._purge_sync()

    async def open(self) -> None:
        await asyncio.to_thread(self.open_sync)

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await asyncio.to_thread(db.close)

    # ---- operations --------------------------------------------------------------------------
    async def put(self, item: StoredResponse) -> None:
        await asyncio.to_thread(self._put_sync, item)

    async def get(self, response_id: str) -> StoredResponse | None:
        return await asyncio.to_thread(self._get_sync, response_id)

    async def delete(self, response_id: str) -> bool:
        return await asyncio.to_thread(self._delete_sync, response_id)

    async def purge_expired(self) -> int:
        return await asyncio.to_thread(self._purge_sync)

    # ---- on a worker thread ------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the response store is not open")
        return self._db

    def _put_sync(self, item: StoredResponse) -> None:
        now = time.time()
        with self._lock:
            db = self._conn()
            db.execute("BEGIN")
            db.execute(
                "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?)",
                (
                    item.id,
                    now,
                    now + self.ttl_s,
                    json.dumps(item.messages),
                    json.dumps(item.input_items),
                    json.dumps(item.response),
                ),
            )
            db.execute("DELETE FROM responses WHERE expires_at <= ?", (now,))
            db.execute("COMMIT")

    def _get_sync(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            row = (
                self._conn()
                .execute(
                    "SELECT messages, input_items, response FROM responses WHERE id = ? AND expires_at > ?",
                    (response_id, time.time()),
                )
                .fetchone()
            )
        if row is None:
            return None
        return StoredResponse(response_id, json.loads(row[0]), json.loads(row[1]), json.loads(row[2]))

    def _delete_sync(self, response_id: str) -> bool:
        with self._lock:
            cursor = self._conn().execute(
                "DELETE FROM responses WHERE id = ? AND expires_at > ?", (response_id, time.time())
            )
            return cursor.rowcount > 0

    def _purge_sync(self) -> int:
        with self._lock:
            cursor = self._conn().execute("DELETE FROM responses WHERE expires_at <= ?", (time.time(),))
            return cursor.rowcount


def _statements(version: int) -> list[str]:
    """The migration's statements, comments stripped (sqlite3 runs one statement per execute)."""
    lines = [line.split("--", 1)[0] for line in _MIGRATIONS[version].splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
