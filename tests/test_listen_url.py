"""PARTICALIZE_DATABASE_LISTEN_URL: the listening connections (a worker's wake-ups, an API process's live feed and
callback sender) go to that URL, the pools to the database URL (behind PgBouncer in transaction mode LISTEN hears
nothing, so the listeners need a direct URL). Which URL a connection came from is told by its application_name,
which PostgreSQL shows in pg_stat_activity."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from particalize.core_options import store_options
from server.live_feed import EventFeed
from server.store import Database, Store, StoreOptions, open_store, upgrade
from server.store.notify import QUEUE, Listener
from server.wakeup import PostgresWakeup
from tests.conftest import PG_ADMIN_URL, make_settings
from tests.tasks import create_task

NEVER = 60.0


def named(url: str, name: str) -> str:
    return make_url(url).update_query_dict({"application_name": name}).render_as_string(hide_password=False)


def application_name(url: str, backend_pid: int) -> str:
    plain = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as conn:
        row = conn.execute("SELECT application_name FROM pg_stat_activity WHERE pid = %s", (backend_pid,)).fetchone()
    assert row is not None, f"no backend {backend_pid}"
    return row[0]


def test_a_worker_listens_on_the_listen_url_and_is_woken_through_it(postgres_url: str):
    main, listen = named(postgres_url, "particalize-pool"), named(postgres_url, "particalize-listen")
    store = open_store(StoreOptions(url=main, listen_url=listen))
    wakeup = PostgresWakeup(store.db, NEVER, NEVER)
    try:
        assert wakeup.listener.wait_listening(10)
        assert application_name(postgres_url, wakeup.listener.backend_pid) == "particalize-listen"
        with store.db.engine.connect() as conn:
            pool_pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        assert application_name(postgres_url, pool_pid) == "particalize-pool", "the pool keeps the database URL"
        assert wakeup.wait(10, threading.Event()), "on connecting: told that anything may have been missed"
        wakeup.clear()
        create_task(store, parameters={"numFrames": "5"}, image_url="https://images.example/a.png")
        assert wakeup.wait(10, threading.Event()), "woken by the task queued"
    finally:
        wakeup.close()
        store.db.dispose()


def test_an_api_process_listens_on_the_listen_url(postgres_url: str):
    db = Database(named(postgres_url, "particalize-pool"), named(postgres_url, "particalize-api-listen"))
    upgrade(db)
    feed = EventFeed.open(Store(db))
    try:
        assert feed.listener is not None and feed.listener.wait_listening(10)
        assert application_name(postgres_url, feed.listener.backend_pid) == "particalize-api-listen"
    finally:
        feed.listener.close()
        db.dispose()


def test_a_listen_url_to_another_database_is_refused_saying_which(postgres_url: str,
                                                                   caplog: pytest.LogCaptureFixture):
    other = make_url(postgres_url).set(database=make_url(PG_ADMIN_URL).database).render_as_string(False)
    db = Database(postgres_url, other)
    upgrade(db)
    listener = Listener(db, (QUEUE,), name="test listener", max_wait_seconds=0.5)
    with caplog.at_level(logging.WARNING, logger="particalize.notify"):
        listener.start()
        deadline = time.monotonic() + 10
        while not any("listening URL reaches database" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "no line about the listening URL"
            time.sleep(0.05)
    listener.close()
    assert not listener.listening and listener.connections == 0
    line = next(r.getMessage() for r in caplog.records if "listening URL reaches" in r.getMessage())
    assert f"'{make_url(PG_ADMIN_URL).database}'" in line and f"'{make_url(postgres_url).database}'" in line
    db.dispose()


def test_the_setting_reaches_the_store_and_needs_postgresql(tmp_path: Path, postgres_url: str):
    listen = named(postgres_url, "x")
    settings = make_settings(tmp_path, postgres_url, database_listen_url=listen)
    assert store_options(settings).listen_url == listen
    separate = Database(postgres_url, listen)
    assert separate.listen_url == listen and separate.listen_engine is not separate.engine
    separate.dispose()
    plain = Database(postgres_url)
    assert plain.listen_engine is plain.engine, "no listening URL: the listeners come from the pool's engine"
    plain.dispose()
    with pytest.raises(ValueError, match="needs PostgreSQL"):
        Database(f"sqlite:///{tmp_path / 'x.db'}", listen)
