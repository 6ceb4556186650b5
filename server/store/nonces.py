"""Replay protection shared by every API process: a nonce is a row; using it twice breaks the primary key."""

from __future__ import annotations

import threading

from sqlalchemy import bindparam, delete
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
        insert = (postgresql.insert if db.is_postgres else sqlite.insert)(Nonce).values(
            api_key=bindparam("api_key"), nonce=bindparam("nonce"), seen_at=bindparam("now")
        )
        # One statement, built once: a new nonce is inserted; a known one is taken again only when its last
        # use is older than the window (rows linger until pruned); otherwise no row comes back: a replay.
        self._use = insert.on_conflict_do_update(
            index_elements=[Nonce.api_key, Nonce.nonce],
            set_={"seen_at": insert.excluded.seen_at},
            where=Nonce.seen_at <= bindparam("cutoff"),
        ).returning(Nonce.nonce)

    def use(self, api_key: str, nonce: str, now: float, window: float) -> bool:
        self._maybe_prune(now, window)
        params = {"api_key": api_key, "nonce": nonce, "now": now, "cutoff": now - window}
        with self.db.connect(write=True) as conn:
            return conn.execute(self._use, params).first() is not None

    def _maybe_prune(self, now: float, window: float) -> None:
        with self._lock:
            if now - self._last_prune < self._prune_every:
                return
            self._last_prune = now
        with self.db.connect(write=True) as conn:
            conn.execute(delete(Nonce).where(Nonce.seen_at <= now - window))
