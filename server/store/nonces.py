"""Replay protection shared by every API process: a nonce is a row; using it twice breaks the primary key."""

from __future__ import annotations

import threading

from sqlalchemy import delete
from sqlalchemy.dialects import postgresql, sqlite

from server.store.db import Database
from server.store.models import Nonce


class DbNonceStore:
    """`server.auth.NonceStore` on the task database, so replay protection holds across API replicas."""

    def __init__(self, db: Database, prune_every_seconds: float = 60.0) -> None:
        self.db = db
        self._prune_every = prune_every_seconds
        self._last_prune = 0.0
        self._lock = threading.Lock()
        self._insert = (postgresql.insert if db.is_postgres else sqlite.insert)(Nonce)

    def use(self, api_key: str, nonce: str, now: float, window: float) -> bool:
        self._maybe_prune(now, window)
        with self.db.connect(write=True) as conn:
            # A row older than the window may linger until pruned: it no longer blocks the nonce.
            conn.execute(delete(Nonce).where(Nonce.api_key == api_key, Nonce.nonce == nonce,
                                             Nonce.seen_at <= now - window))
            inserted = conn.execute(
                self._insert.values(api_key=api_key, nonce=nonce, seen_at=now)
                .on_conflict_do_nothing()
                .returning(Nonce.nonce)
            ).first()
            return inserted is not None

    def _maybe_prune(self, now: float, window: float) -> None:
        with self._lock:
            if now - self._last_prune < self._prune_every:
                return
            self._last_prune = now
        with self.db.connect(write=True) as conn:
            conn.execute(delete(Nonce).where(Nonce.seen_at <= now - window))
