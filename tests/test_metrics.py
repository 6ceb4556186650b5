"""GET /metrics: gauges read from the store at scrape time move by exactly what happened (queued,
succeeded, failed, cancelled, alive workers), and the step, video and queue-wait histograms count what
the task events record."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from particalize.compose_server import build_app
from particalize.core_options import worker_options
from server.metrics import EventTimings
from server.store.models import OUTPUT, START
from server.worker import Worker
from tests.conftest import make_settings
from tests.images import png_bytes

RUN = "/v1/Run/codexq/Particalize"
SMALL = {"numFrames": "5", "steps": "3", "width": "32", "height": "32"}
GOOD, BROKEN = "http://images.test/dog.png", "http://images.test/broken.png"
TOOL = 'tool="codexq/Particalize"'
"""The default tool's label: the only tool of this server (tests/test_tool_tasks.py has several)."""


def fetch(url: str, **_: object) -> tuple[bytes, str]:
    """The worker's image fetch: a PNG, or bytes that do not decode."""
    return (png_bytes(40, 40), "image/png") if url == GOOD else (b"\x89PNG but not really", "image/png")


@pytest.fixture
def settings(tmp_path: Path, db_url: str):
    return make_settings(tmp_path, db_url, allow_private_urls=True)


@pytest.fixture
def client(settings):
    with TestClient(build_app(settings)) as client:
        yield client


def scrape(client: TestClient) -> dict[str, float]:
    """Every sample as {'name{label="v"}': value}."""
    answer = client.get("/metrics")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def moved(after: dict[str, float], before: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def test_metrics_move_by_exactly_what_happened(client, settings, tiny_generator):
    services = client.app.state.services
    store = services.store
    before = scrape(client)
    assert before["particalize_queue_depth"] == 0

    ids = []
    for url in (GOOD, GOOD, BROKEN, GOOD):
        answer = client.post(RUN, json={"inputImageUrl": url, **SMALL}).json()
        assert answer["result"] is True, answer
        ids.append(answer["taskid"])
    assert scrape(client)["particalize_queue_depth"] == 4, "queue depth is read from the database"
    assert client.post("/v1/Task/Cancel", json={"taskid": ids[3]}).json()["result"] is True
    queued = scrape(client)
    assert queued["particalize_queue_depth"] == 3 and queued[f'particalize_tasks{{status="task_queue",{TOOL}}}'] == 3

    store.workers.register("testnode/gpu0", pid=1, model="tiny", device="cpu", state="ready")
    store.clock = lambda: time.time() - 10 * store.options.lease_seconds
    store.workers.register("gone/gpu0", pid=2, model="tiny", device="cpu", state="ready")  # no heartbeat since
    store.clock = time.time
    worker = Worker(store, services.storage, tiny_generator, worker_options(settings),
                    worker_id="testnode/gpu0", fetch=fetch)
    assert [worker.run_once() for _ in range(4)] == [True, True, True, False]
    after = scrape(client)

    assert after["particalize_queue_depth"] == 0 and after["particalize_tasks_running"] == 0
    assert moved(after, before, f'particalize_tasks_finished{{outcome="succeeded",{TOOL}}}') == 2
    assert moved(after, before, f'particalize_tasks_finished{{outcome="failed",{TOOL}}}') == 1
    assert moved(after, before, f'particalize_tasks_finished{{outcome="cancelled",{TOOL}}}') == 1
    assert after[f'particalize_tasks{{status="task_postprocess_end",{TOOL}}}'] == 3
    assert after['particalize_workers{state="ready"}'] == 1, "the stale worker is not counted"
    assert after['particalize_workers{state="busy"}'] == 0

    step_count, step_sum = f"particalize_step_seconds_count{{{TOOL}}}", f"particalize_step_seconds_sum{{{TOOL}}}"
    assert moved(after, before, step_count) == 6, "3 steps each of the 2 tasks that ran"
    assert moved(after, before, f"particalize_video_seconds_count{{{TOOL}}}") == 2, "the two videos made"
    assert moved(after, before, f"particalize_queue_wait_seconds_count{{{TOOL}}}") == 3, "the three tasks taken"
    assert after[f'particalize_step_seconds_bucket{{le="+Inf",{TOOL}}}'] == after[step_count]

    denoising = 0.0
    for taskid in ids[:2]:
        events = store.reads.events(int(taskid))
        start = next(e.at for e in events if e.status == START)
        denoising += [e.at for e in events if e.status == OUTPUT][-1] - start
    assert after[step_sum] == pytest.approx(denoising, abs=1e-6), "steps add up"
    assert after[f"particalize_video_seconds_sum{{{TOOL}}}"] > 0

    again = scrape(client)
    assert again[step_count] == after[step_count], "nothing twice"
    assert "process_cpu_seconds_total" in again


class FakeStore:
    """events_after as the store answers it, over a list we fill as transactions 'commit'."""

    def __init__(self) -> None:
        self.committed: list[SimpleNamespace] = []

    def add(self, id_: int, task: int, status: str, at: float, step: int | None = None,
            total: int | None = None) -> None:
        message = f"step {step}/{total}" if step is not None else ""
        self.committed.append(SimpleNamespace(id=id_, task_id=task, status=status, at=at, message=message,
                                              step=step, total=total))

    def tools_of(self, task_ids) -> dict[int, str]:
        return {}

    def events_after(self, after_id: int, limit: int, also_ids=()) -> list[SimpleNamespace]:
        extra = set(also_ids)
        found = sorted((e for e in self.committed if e.id > after_id or e.id in extra), key=lambda e: e.id)
        return found[:limit]


def test_an_event_committed_after_a_later_one_is_still_counted():
    """On PostgreSQL a transaction can commit after one that took a later id; the gap is read again."""
    store = FakeStore()
    timings = EventTimings()
    store.add(1, 7, START, 100.0)
    store.add(3, 8, START, 100.0)  # event 2 (task 7's first step) is not committed yet
    timings.update(store, now=101.0)
    assert timings.step.count == 0 and set(timings.gaps) == {2}
    store.add(2, 7, OUTPUT, 102.0, step=2, total=2)
    store.add(4, 8, OUTPUT, 101.0, step=1, total=2)
    timings.update(store, now=102.0)
    assert timings.step.count == 3 and timings.step.sum == pytest.approx(1.0 + 1.0 + 1.0)
    assert timings.gaps == {}
    timings.update(store, now=103.0)
    assert timings.step.count == 3, "each event is taken once"
