"""Durable state: tasks, outputs, uploads, nonces and workers in SQLite (default) or PostgreSQL.

`Store` bundles one database's parts, one per job: `tasks` (the lifecycle and the API's controls), `reads`,
`uploads`, `workers` (the registry) and `callbacks` (the outbox).
"""

from server.store.db import Database
from server.store.errors import NoWorker, QueueFull, TaskKilled, TaskLost, TooManyActive
from server.store.ids import new_id, new_token
from server.store.lifecycle import KillOutcome, NewOutput, Recovered, TaskLifecycle
from server.store.migrate import upgrade
from server.store.nonces import DbNonceStore
from server.store.store import Store, StoreOptions, open_store
from server.store.uploads import NewUpload

__all__ = [
    "Database",
    "DbNonceStore",
    "KillOutcome",
    "NewOutput",
    "NewUpload",
    "NoWorker",
    "QueueFull",
    "Recovered",
    "Store",
    "StoreOptions",
    "TaskKilled",
    "TaskLifecycle",
    "TaskLost",
    "TooManyActive",
    "new_id",
    "new_token",
    "open_store",
    "upgrade",
]
