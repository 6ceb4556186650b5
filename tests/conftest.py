"""Shared fixtures: settings on the tiny preset in temporary directories, a database URL for each store backend
(SQLite, and PostgreSQL in a fresh database made for this test session), and a loopback server of input images."""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from particalize.settings import Settings
from tests.images import ImageServer

PG_ADMIN_URL = os.environ.get("PARTICALIZE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
POSTGRES_DISABLED = os.environ.get("PARTICALIZE_TEST_POSTGRES", "1") == "0"


def _pg_url(database: str, schema: str | None = None) -> str:
    from sqlalchemy.engine import make_url

    url = make_url(PG_ADMIN_URL).set(drivername="postgresql+psycopg", database=database)
    if schema:
        url = url.update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """Tests that call the CLI's main() get its log handler (on pytest's captured stderr, closed after the test);
    put the root logger back so later tests neither lose log records nor write to a closed stream."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


FREE_RAM_SEEN_BY_TESTS = 8 * 2**30


@pytest.fixture(autouse=True)
def _free_ram_is_a_fixed_figure(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test passes or fails with the host's free memory: the memory check sees 8 GiB available (a small
    newcomer's machine) unless a test of the check injects its own figure."""
    monkeypatch.setattr("pipeline.memory_check.free_ram", lambda: FREE_RAM_SEEN_BY_TESTS)


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A database of its own for this test session, dropped at the end."""
    if POSTGRES_DISABLED:
        pytest.skip("PostgreSQL tests disabled (PARTICALIZE_TEST_POSTGRES=0)")
    import psycopg

    name = f"particalize_test_{secrets.token_hex(6)}"
    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at {PG_ADMIN_URL} ({exc}). Start it (scripts/ensure-postgres.sh), point "
            "PARTICALIZE_TEST_POSTGRES_URL at one, or set PARTICALIZE_TEST_POSTGRES=0 to skip its tests."
        )
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_url(postgres_database: str) -> Iterator[str]:
    """A URL whose tables live in a schema of their own (a clean database for each test)."""
    import psycopg

    schema = f"t_{secrets.token_hex(6)}"
    database_url = _pg_url(postgres_database)
    plain = database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield _pg_url(postgres_database, schema)
    finally:
        with psycopg.connect(plain, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each store and API test runs on both backends."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'tasks.db'}"
    return request.getfixturevalue("postgres_url")


def make_settings(tmp_path: Path, db_url: str | None = None, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        model="tiny",
        data_dir=tmp_path / "data",
        database_url=db_url,
        workers=0,
        host="127.0.0.1",
        port=8000,
        public_base_url="http://testserver",
        api_keys=None,
        api_keys_file=None,
        allow_private_urls=False,
        allow_unauthenticated_public=False,
        progress_interval_seconds=0.0,
        worker_poll_seconds=0.02,
        callback_backoff_seconds=0.05,
        callback_timeout_seconds=2.0,
        node_name="testnode",
        tools_file=None,
    )
    values.update(overrides)
    return Settings().with_overrides(**values).model_copy(update={k: v for k, v in values.items() if v is None})


@pytest.fixture
def store(settings: Settings) -> Iterator[Any]:
    """The (migrated) task store of the module's `settings` fixture."""
    from particalize.core_options import store_options
    from server.store import Database, Store, upgrade

    db = Database(settings.sqlalchemy_url)
    upgrade(db)
    yield Store(db, store_options(settings))
    db.dispose()


@pytest.fixture(scope="session")
def tiny_generator(tmp_path_factory: pytest.TempPathFactory):
    """One warm tiny model for the whole session (as a worker keeps it)."""
    from pipeline.generator import GeneratorOptions, VideoGenerator
    from pipeline.presets import get_preset

    return VideoGenerator(GeneratorOptions(get_preset("tiny"), tmp_path_factory.mktemp("weights")))


@pytest.fixture(scope="module")
def images() -> Iterator[ImageServer]:
    """Input images served over loopback HTTP (for Runs that name an image URL), one server per test module."""
    server = ImageServer()
    yield server
    server.close()
