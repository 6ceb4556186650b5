"""The response models that /openapi.json is written from (server/answers.py) are the answers: every answer of every
Wiro route, success and failure, validates against its model, and the model's dump renders the very bytes the route
sent (every key named, in Wiro's order, with its type), so the document cannot drift from what clients read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel

from particalize.compose_server import build_app
from server.answers import (
    EmptyAnswer,
    ErrorAnswer,
    ExploreAnswer,
    RunAnswer,
    TaskListAnswer,
    TaskListTotalAnswer,
    ToolDetailAnswer,
    ToolListAnswer,
    UploadAnswer,
)
from tests.conftest import make_settings
from tests.images import png_bytes
from tests.test_api import KEY, RUN, SECRET, SMALL, run_worker_once, signed


@pytest.fixture
def settings(tmp_path: Path):
    return make_settings(tmp_path, f"sqlite:///{tmp_path / 'tasks.db'}", api_keys=f"{KEY}:{SECRET}",
                         allow_private_urls=True)


def assert_is(model: type[BaseModel], answer: httpx.Response) -> None:
    """`answer` validates against `model`, and the model's dump is the answer to the byte."""
    dumped = model.model_validate(answer.json()).model_dump(mode="json", by_alias=True)
    rendered = json.dumps(dumped, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":"))
    assert rendered == answer.text, model.__name__


def test_every_answer_is_its_model_to_the_byte(settings, tiny_generator):
    with TestClient(build_app(settings)) as client:
        def post(path: str, body: dict[str, Any] | None = None, **kwargs: Any) -> httpx.Response:
            headers = kwargs.pop("headers", signed())
            return client.post(path, headers=headers, **({"json": body} if body is not None else {}), **kwargs)

        upload = post("/v1/File/Upload", files={"file": ("dog.png", png_bytes(48, 32), "image/png")})
        assert_is(UploadAnswer, upload)
        image_url = upload.json()["list"][0]["url"]
        done = post(RUN, {**SMALL, "inputImageUrl": image_url, "callbackUrl": "http://127.0.0.1:9/hook"})
        assert_is(RunAnswer, done)
        taskid = done.json()["taskid"]
        assert run_worker_once(client, settings, tiny_generator)
        detail = post("/v1/Task/Detail", {"taskid": taskid})
        assert detail.json()["tasklist"][0]["outputs"], "an output, so that its model is checked too"
        assert_is(TaskListTotalAnswer, detail)
        queued = post(RUN, data={**SMALL, "prompt": "a cat"},
                      files={"inputImage": ("cat.png", png_bytes(40, 40), "image/png")})
        assert_is(RunAnswer, queued)
        assert_is(TaskListTotalAnswer, post("/v1/Task/List", {"start": "0", "limit": "5"}))
        assert_is(TaskListAnswer, post("/v1/Task/Cancel", {"taskid": queued.json()["taskid"]}))
        killed = post(RUN, {**SMALL, "inputImageUrl": image_url})
        client.app.state.services.store.tasks.claim_next("testnode/gpu0")  # running: it can be killed
        assert_is(TaskListAnswer, post("/v1/Task/Kill", {"socketaccesstoken": killed.json()["socketaccesstoken"]}))
        assert_is(EmptyAnswer, post("/v1/Task/InputOutputDelete", {"taskid": taskid}))
        assert_is(ToolDetailAnswer, post("/v1/Tool/Detail", {"slugowner": "codexq", "slugproject": "Particalize"}))
        assert_is(ToolListAnswer, post("/v1/Tool/List", {"search": "particalize"}))
        assert_is(ExploreAnswer, post("/v1/Tool/Explore", {}))
        assert_is(ExploreAnswer, post("/v1/Tool/Explore", {"search": "text to speech"}))

        for failed in (post(RUN, {**SMALL, "numFrames": "10", "inputImageUrl": image_url}),
                       post("/v1/Task/Detail", {"taskid": "999999"}), post("/v1/Task/Kill", {}),
                       post(RUN, json=SMALL, headers={}), post("/v1/Nothing/Here")):
            assert failed.json()["result"] is False
            assert_is(ErrorAnswer, failed)


def test_the_document_names_each_routes_answer_and_its_errors(settings):
    with TestClient(build_app(settings)) as client:
        document = client.get("/openapi.json").json()
    answers = {path: operation["post"]["responses"] for path, operation in document["paths"].items()}
    expected = {RUN: "RunAnswer", "/v1/Task/Detail": "TaskListTotalAnswer", "/v1/Task/List": "TaskListTotalAnswer",
                "/v1/Task/Kill": "TaskListAnswer", "/v1/Task/Cancel": "TaskListAnswer",
                "/v1/Task/InputOutputDelete": "EmptyAnswer", "/v1/Tool/Detail": "ToolDetailAnswer",
                "/v1/Tool/List": "ToolListAnswer", "/v1/Tool/Explore": "ExploreAnswer",
                "/v1/File/Upload": "UploadAnswer"}
    for path, name in expected.items():
        ok = answers[path]["200"]["content"]["application/json"]["schema"]["anyOf"]
        assert [ref["$ref"].rsplit("/", 1)[-1] for ref in ok] == [name, "ErrorAnswer"], path
        assert answers[path]["401"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorAnswer")
    schemas = document["components"]["schemas"]
    assert schemas["RunAnswer"]["properties"]["result"]["const"] is True
    assert schemas["ErrorAnswer"]["properties"]["result"]["const"] is False
    assert document["components"]["securitySchemes"]["signature"]["name"] == "x-signature"
    assert document["openapi"].startswith("3.1")
