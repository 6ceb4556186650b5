"""Wiro's per-key concurrency limit (code 96) across two real API processes (`particalize serve --workers 0`)
sharing one PostgreSQL database: Runs of one key sent to both at once never make more active tasks than the limit,
each refused one says how many are active and what the limit is, another key has its own, and a cancelled task
frees its place for a Run sent to the other process."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from benchmarks.harness import ServeProcess
from server.auth import sign
from server.store import Database, Store

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

RUN = "/v1/Run/codexq/Particalize"
LIMIT = 3
RUNS = 16
KEYS = {"k1": "secret-one", "k2": "secret-two"}
NONCE = "12345"
"""One nonce for every call, as the seed's sample signs once ("unix time or any random integer value")."""
BODY = {"inputImageUrl": "http://127.0.0.1:9/dog.png", "numFrames": "9", "steps": "2", "width": "32",
        "height": "32"}


def headers(key: str) -> dict[str, str]:
    return {"x-api-key": key, "x-nonce": NONCE, "x-signature": sign(key, KEYS[key], NONCE)}


@pytest.fixture
def apis(tmp_path: Path, postgres_url: str) -> Iterator[list[ServeProcess]]:
    env = {"PARTICALIZE_API_KEYS": ",".join(f"{k}:{s}" for k, s in KEYS.items()),
           "PARTICALIZE_MAX_ACTIVE_TASKS_PER_KEY": str(LIMIT), "PARTICALIZE_ALLOW_PRIVATE_URLS": "1",
           "PARTICALIZE_ACCESS_LOG": "0", "PARTICALIZE_NODE_NAME": "api"}
    started = [ServeProcess(tmp_path / f"api{i}", database_url=postgres_url, args=["--workers", "0"], env=env)
               for i in range(2)]
    try:
        for api in started:
            api.wait_up()
        yield started
    finally:
        for api in started:
            api.stop()


def run_at_once(apis: list[ServeProcess], key: str, count: int) -> list[dict]:
    """`count` Runs of `key`, alternating between the API processes, released together."""
    start = threading.Barrier(count)

    def one(i: int) -> dict:
        start.wait()
        answer = httpx.post(f"{apis[i % len(apis)].base}{RUN}", json=BODY, headers=headers(key), timeout=60)
        assert answer.status_code == 200, answer.text
        return answer.json()

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def test_one_keys_active_tasks_stay_within_the_limit_across_two_api_processes(apis: list[ServeProcess],
                                                                             postgres_url: str):
    answers = run_at_once(apis, "k1", RUNS)
    accepted = [a for a in answers if a["result"]]
    refused = [a for a in answers if not a["result"]]
    assert len(accepted) == LIMIT, answers
    for answer in refused:
        (error,) = answer["errors"]
        assert error["code"] == 96, answer
        assert f"{LIMIT} are queued or running and the limit is {LIMIT}" in error["message"], answer

    db = Database(postgres_url)
    try:
        assert Store(db).reads.active_count("k1") == LIMIT
        assert sum(a["result"] for a in run_at_once(apis, "k2", 6)) == LIMIT, "another key has its own limit"

        cancel = httpx.post(f"{apis[0].base}/v1/Task/Cancel", json={"taskid": accepted[0]["taskid"]},
                            headers=headers("k1"), timeout=30).json()
        assert cancel["result"] is True, cancel
        again = httpx.post(f"{apis[1].base}{RUN}", json=BODY, headers=headers("k1"), timeout=30).json()
        assert again["result"] is True, "the cancelled task's place, taken through the other process"
        full = httpx.post(f"{apis[0].base}{RUN}", json=BODY, headers=headers("k1"), timeout=30).json()
        assert full["errors"][0]["code"] == 96
        assert Store(db).reads.active_count("k1") == LIMIT
    finally:
        db.dispose()
