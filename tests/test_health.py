"""Probes: GET /health (the process and its database answer), GET /ready (and a worker is alive with its
model loaded), both 503 in the API's error shape saying why; /healthz lists each worker's version and task."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import particalize
from particalize.compose_server import build_app, open_storage, server_options
from particalize.core_options import store_options, worker_options
from server.auth import Authenticator, AuthOptions
from server.services import Services
from server.store import Database, DbNonceStore, Store, upgrade
from server.store.migrate import current_revision
from server.worker import run_worker
from tests.conftest import make_settings
from tests.tasks import create_task

UNREACHABLE_DB = "postgresql://postgres@127.0.0.1:1/nowhere?connect_timeout=2"


@pytest.fixture
def settings(tmp_path: Path, db_url: str):
    return make_settings(tmp_path, db_url, lease_seconds=5.0)


@pytest.fixture
def client(settings):
    with TestClient(build_app(settings)) as client:
        yield client


def store_of(client: TestClient) -> Store:
    return client.app.state.services.store


def register(store: Store, worker_id: str, state: str, seconds_ago: float = 0.0, version: str = "1.2.3") -> None:
    stamped = Store(store.db, store.options, clock=lambda: time.time() - seconds_ago)
    stamped.workers.register(worker_id, pid=4242, model="tiny", device="cpu", state=state, version=version)


def assert_unavailable(answer, *fragments: str) -> None:
    assert answer.status_code == 503
    body = answer.json()
    assert body["result"] is False and body["errors"][0]["code"] == 0, body
    for fragment in fragments:
        assert fragment in body["errors"][0]["message"], body


def test_health_answers_when_the_database_does(client: TestClient):
    answer = client.get("/health")
    assert answer.status_code == 200
    assert answer.json() == {"result": True, "errors": [], "database": "ok"}


def test_ready_needs_a_registered_worker(client: TestClient):
    assert_unavailable(client.get("/ready"), "No worker has registered", "particalize worker")


def test_ready_needs_a_worker_with_its_model_loaded(client: TestClient):
    register(store_of(client), "n1/gpu0", "loading")
    register(store_of(client), "n2/gpu0", "stopping")
    assert_unavailable(client.get("/ready"), "n1/gpu0 is loading", "n2/gpu0 is stopping")


def test_ready_ignores_a_worker_whose_heartbeat_is_older_than_a_lease(client: TestClient):
    register(store_of(client), "n1/gpu0", "busy", seconds_ago=20)
    assert_unavailable(client.get("/ready"), "n1/gpu0 last seen 20s ago (more than the 5s lease)")


def test_ready_says_why_a_worker_is_paused(client: TestClient):
    store = store_of(client)
    register(store, "n1/gpu0", "ready")
    store.workers.set_state("n1/gpu0", "paused", detail="Not enough free disk space to write the output: ...")
    assert_unavailable(client.get("/ready"), "n1/gpu0 is paused: Not enough free disk space")


@pytest.mark.parametrize("state", ["ready", "busy"])
def test_ready_with_one_live_loaded_worker(client: TestClient, state: str):
    register(store_of(client), "old/gpu0", "ready", seconds_ago=60)
    register(store_of(client), "n1/gpu0", state, seconds_ago=1)
    answer = client.get("/ready")
    assert answer.status_code == 200
    body = answer.json()
    assert {k: body[k] for k in ("result", "errors", "database", "workers")} == {
        "result": True, "errors": [], "database": "ok", "workers": "1"}
    assert [w["worker"] for w in body["loaded"]] == ["n1/gpu0"]  # what it loaded (model, LoRAs) in "detail"


def test_health_and_ready_say_when_the_database_is_down(tmp_path: Path):
    settings = make_settings(tmp_path, UNREACHABLE_DB)
    db = Database(UNREACHABLE_DB)
    services = Services(server_options(settings), Store(db, store_options(settings)), open_storage(settings),
                        Authenticator(AuthOptions(nonce_window_seconds=settings.nonce_window_seconds),
                                      DbNonceStore(db)))
    with TestClient(build_app(settings, services=services)) as client:
        assert_unavailable(client.get("/health"), "The database does not answer", "PARTICALIZE_DATABASE_URL")
        assert_unavailable(client.get("/ready"), "The database does not answer")
    db.dispose()


def test_healthz_lists_each_workers_version_and_current_task(client: TestClient):
    store = store_of(client)
    register(store, "n1/gpu0", "ready", version="9.9.9")
    idle = client.get("/healthz").json()["workers"][0]
    assert (idle["id"], idle["version"], idle["taskid"], idle["state"]) == ("n1/gpu0", "9.9.9", "", "ready")
    task = create_task(store, parameters={}, image_url="https://example.com/a.png")
    store.tasks.claim_next("n1/gpu0")
    busy = client.get("/healthz").json()["workers"][0]
    assert (busy["state"], busy["taskid"]) == ("busy", str(task.id))


def test_a_worker_registers_the_particalize_version_it_runs(settings, tiny_generator):
    stop = threading.Event()
    stop.set()  # loads, registers, finds the stop asked, and ends
    assert run_worker(worker_options(settings), open_storage(settings), lambda: tiny_generator, stop) == 0
    db = Database(settings.sqlalchemy_url)
    (row,) = Store(db).workers.all()
    db.dispose()
    assert (row.id, row.version, row.state, row.pid) == ("testnode/gpu0", particalize.__version__, "stopped",
                                                        os.getpid())


def test_the_version_migration_keeps_the_workers_registered_before_it(db_url: str):
    db = Database(db_url)
    upgrade(db, "0001")
    with db.connect(write=True) as conn:
        conn.exec_driver_sql(
            "INSERT INTO workers (id, state, pid, model, device, detail, started_at, heartbeat_at) "
            "VALUES ('old/gpu0', 'ready', 1, 'tiny', 'cpu', '', 1.0, 1.0)"
        )
    upgrade(db)
    assert current_revision(db) == "0006"
    (row,) = Store(db).workers.all()
    assert (row.id, row.version) == ("old/gpu0", "")
    db.dispose()


def test_ready_says_loudly_when_a_worker_serves_random_weights(client: TestClient, settings, tiny_generator,
                                                               monkeypatch):
    monkeypatch.setattr(tiny_generator, "random_weights", True)
    stop = threading.Event()
    stop.set()
    assert run_worker(worker_options(settings), open_storage(settings), lambda: tiny_generator, stop) == 0
    (row,) = store_of(client).workers.all()
    assert "RANDOM WEIGHTS" in row.detail and "noise" in row.detail
    assert row.random_weights
    store_of(client).workers.register("n1/gpu0", pid=1, model="wan2.1-i2v-14b-480p", device="cuda:0", state="ready",
                                      detail=row.detail, random_weights=row.random_weights)
    body = client.get("/ready").json()
    assert body["workers"] == "1"
    assert "n1/gpu0" in body["warning"] and "RANDOM WEIGHTS" in body["warning"] and "noise" in body["warning"]


def test_health_and_ready_name_no_database_url_host_port_or_path(tmp_path: Path):
    unreadable = tmp_path / "tasks.db"
    unreadable.mkdir()  # a directory where the SQLite file should be: it cannot be opened
    for url in (UNREACHABLE_DB, f"sqlite:///{unreadable}"):
        settings = make_settings(tmp_path, url)
        db = Database(url)
        services = Services(server_options(settings), Store(db, store_options(settings)), open_storage(settings),
                            Authenticator(AuthOptions(nonce_window_seconds=settings.nonce_window_seconds),
                                          DbNonceStore(db)))
        with TestClient(build_app(settings, services=services)) as client:
            for probe in ("/health", "/ready"):
                answer = client.get(probe)
                assert_unavailable(answer, "The database does not answer", "the server log has the details")
                for secret in ("127.0.0.1", "port", "nowhere", "postgres@", str(tmp_path), "tasks.db", "sqlite",
                               "http"):
                    assert secret not in answer.text.lower(), (probe, secret, answer.text)
        db.dispose()


def test_ready_shows_no_server_path_from_a_workers_detail(client: TestClient):
    store_of(client).workers.register("n1/gpu0", pid=1, model="tiny", device="cpu", state="ready",
                                      detail="loaded in 1.0s; LoRAs: /srv/models/particalize.safetensors, strength 1")
    body = client.get("/ready").json()
    assert "/srv/models" not in str(body) and "<path>" in body["loaded"][0]["detail"]
    assert "/srv/models" not in client.get("/healthz").text


def test_ready_takes_a_paused_workers_own_word_over_the_store(client: TestClient):
    register(store_of(client), "n1/gpu0", "ready")  # what the store says: it could not be written since
    reports = client.app.state.worker_reports
    reports.report("n1/gpu0", "paused", "Not enough free disk space to write the output: 0.0 B free")
    assert_unavailable(client.get("/ready"), "n1/gpu0 is paused: Not enough free disk space")
    reports.report("n1/gpu0", "ready")
    assert client.get("/ready").status_code == 200


def test_worker_reports_travel_over_a_pipe_and_end_with_the_worker():
    from server.worker_reports import WorkerReports, pipe_reporter

    reports = WorkerReports()
    read_fd, write_fd = os.pipe()
    reader = threading.Thread(target=reports.read_pipe, args=(read_fd,), daemon=True)
    reader.start()
    report = pipe_reporter(write_fd, "n1/gpu0")
    report("paused", "Not enough free disk space")
    deadline = time.monotonic() + 5
    while not reports.paused() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert reports.paused() == {"n1/gpu0": "Not enough free disk space"}
    os.close(write_fd)  # the worker process ends
    reader.join(5)
    assert reports.paused() == {}, "a worker that is gone is not taken at its word"
