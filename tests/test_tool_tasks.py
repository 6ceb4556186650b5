"""A catalogue tool's tasks as a client and an operator see them: Task/Detail's prompt is what the client sent (or the
tool's default) while the generator runs it with the tool's trigger word; the metrics count each tool's tasks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from particalize.compose_server import build_app
from particalize.core_options import worker_options
from server.worker import Worker
from tests.conftest import make_settings
from tests.images import png_bytes
from tests.test_tools import SMALL, two_tools, write


class PromptsSeen:
    """The warm tiny model, recording the prompt and tool of every run the worker asks for (the default tool's
    LoRAs run: this test is about what the generator is asked, test_tool_switch about the LoRAs)."""

    def __init__(self, generator: Any) -> None:
        self.generator = generator
        self.runs: list[tuple[str, str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.generator, name)

    def generate(self, params, image, progress=None, should_stop=None, interrupt=None, tool: str = ""):
        self.runs.append((params.prompt, tool))
        return self.generator.generate(params, image, progress, should_stop, interrupt)


@pytest.fixture
def settings(tmp_path: Path):
    return make_settings(tmp_path, f"sqlite:///{tmp_path / 'tasks.db'}", allow_private_urls=True,
                         tools_file=write(tmp_path, two_tools(tmp_path)))


@pytest.fixture
def client(settings) -> Iterator[TestClient]:
    with TestClient(build_app(settings)) as client:
        yield client


def detail(client: TestClient, taskid: str) -> dict:
    return client.post("/v1/Task/Detail", json={"taskid": taskid}).json()["tasklist"][0]


def test_task_detail_shows_the_prompt_sent_and_the_generator_runs_it_with_the_trigger(client, settings,
                                                                                      tiny_generator):
    """Wiro's `parameters` echo the inputs as sent (the seed's Kill answer): the trigger word is the server's
    addition for the LoRA, so it is in the generator's prompt, not in what Task/Detail shows."""
    sent = client.post("/v1/Run/remade/Squish", json={**SMALL, "prompt": "a dog"}).json()["taskid"]
    default = client.post("/v1/Run/remade/Squish", json=SMALL).json()["taskid"]
    has_it = client.post("/v1/Run/remade/Squish", json={**SMALL, "prompt": "SQ41SH a dog"}).json()["taskid"]
    plain = client.post("/v1/Run/remade/Inflate", json={**SMALL, "prompt": "a dog"}).json()["taskid"]
    shown = {taskid: detail(client, taskid)["parameters"]["prompt"] for taskid in (sent, default, has_it, plain)}
    assert shown == {sent: "a dog", default: "a cat is squished", has_it: "SQ41SH a dog", plain: "a dog"}

    seen = PromptsSeen(tiny_generator)
    services = client.app.state.services
    worker = Worker(services.store, services.storage, seen, worker_options(settings), worker_id="testnode/gpu0",
                    fetch=lambda url, **kw: (png_bytes(32, 32), "image/png"))
    for _ in range(4):
        assert worker.run_once()
    assert seen.runs == [("sq41sh a dog", "remade/Squish"), ("sq41sh a cat is squished", "remade/Squish"),
                         ("SQ41SH a dog", "remade/Squish"), ("a dog", "remade/Inflate")]
    for taskid, prompt in shown.items():
        done = detail(client, taskid)
        assert done["pexit"] == "0", done["debugerror"]
        assert done["parameters"]["prompt"] == prompt, "after the run too"


def samples(collector) -> dict[str, float]:
    """Every sample a collector gives, as {'name{label="v",...}': value}."""
    found = {}
    for family in collector.collect():
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return found


def test_the_metrics_count_each_tools_tasks_under_the_catalogues_slugs_only(tmp_path, db_url, tiny_generator):
    from server.metrics import StoreCollector

    settings = make_settings(tmp_path, db_url, allow_private_urls=True,
                             tools_file=write(tmp_path, two_tools(tmp_path)))
    with TestClient(build_app(settings)) as client:
        for slug in ("remade/Squish", "remade/Squish", "remade/Inflate"):
            assert client.post(f"/v1/Run/{slug}", json={**SMALL, "steps": "3"}).json()["result"] is True
        queued = client.post("/v1/Run/remade/Squish", json=SMALL).json()["taskid"]
        services = client.app.state.services
        worker = Worker(services.store, services.storage, PromptsSeen(tiny_generator), worker_options(settings),
                        worker_id="testnode/gpu0", fetch=lambda url, **kw: (png_bytes(32, 32), "image/png"))
        assert [worker.run_once() for _ in range(3)] == [True, True, True]
        scraped = client.get("/metrics").text
        assert 'particalize_tasks_finished{outcome="succeeded",tool="remade/Squish"} 2.0' in scraped
        assert 'particalize_tasks_finished{outcome="succeeded",tool="remade/Inflate"} 1.0' in scraped
        assert 'particalize_tasks_finished{outcome="succeeded",tool="codexq/Particalize"} 0.0' in scraped
        assert 'particalize_tasks{status="task_queue",tool="remade/Squish"} 1.0' in scraped
        assert 'particalize_queue_depth 1.0' in scraped, "the queue's depth stays a total"
        assert 'particalize_step_seconds_count{tool="remade/Squish"} 6.0' in scraped
        assert 'particalize_step_seconds_count{tool="remade/Inflate"} 3.0' in scraped
        assert 'particalize_step_seconds_count{tool="codexq/Particalize"} 0.0' in scraped
        assert 'particalize_video_seconds_count{tool="remade/Inflate"} 1.0' in scraped
        assert 'particalize_queue_wait_seconds_count{tool="remade/Squish"} 2.0' in scraped

        # A catalogue without Inflate (changed since its task ran): that task counts as `other`, no new label.
        found = samples(StoreCollector(services.store, ["codexq/Particalize", "remade/Squish"]))
        tools = {label.split('tool="')[1].split('"')[0] for label in found if 'tool="' in label}
        assert tools == {"codexq/Particalize", "remade/Squish", "other"}
        assert found['particalize_tasks_finished{outcome="succeeded",tool="other"}'] == 1
        assert found['particalize_step_seconds_count{tool="other"}'] == 3
        assert client.post("/v1/Task/Cancel", json={"taskid": queued}).json()["result"] is True
