"""The catalogue and listing calls in the shapes Wiro's official client sends and reads (src/client.ts,
src/types.ts): Tool/List (searchModels), Tool/Explore (explore), Task/List with its filters, Tool/Detail's
image inputs; and what a task records of the parameters it runs with."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from particalize.compose_server import build_app
from particalize.core_options import worker_options
from pipeline.params import DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT
from server.worker import Worker
from tests.conftest import make_settings
from tests.images import png_bytes

RUN = "/v1/Run/codexq/Particalize"
SMALL = {"inputImageUrl": "http://127.0.0.1:9/dog.png", "numFrames": "9", "steps": "2", "width": "32",
         "height": "32"}


@pytest.fixture
def settings(tmp_path: Path):
    return make_settings(tmp_path, f"sqlite:///{tmp_path / 'tasks.db'}", allow_private_urls=True)


@pytest.fixture
def client(settings) -> Iterator[TestClient]:
    with TestClient(build_app(settings)) as client:
        yield client


def search_models(client: TestClient, **params) -> dict:
    """The body of the client's searchModels(params)."""
    body = {"start": str(params.pop("start", 0)), "limit": str(params.pop("limit", 20)),
            "search": params.pop("search", ""), "categories": params.pop("categories", []),
            "sort": params.pop("sort", "relevance"), "hideworkflows": True, "summary": True, **params}
    answer = client.post("/v1/Tool/List", json=body)
    assert answer.status_code == 200
    return answer.json()


def test_tool_list_answers_this_servers_tool_in_the_clients_shape(client: TestClient):
    body = search_models(client)
    assert body["result"] is True and body["errors"] == [] and body["total"] == "1"
    (tool,) = body["tool"]
    assert (tool["cleanslugowner"], tool["cleanslugproject"]) == ("codexq", "particalize")
    assert isinstance(tool["categories"], list) and isinstance(tool["parameters"], list)
    assert all(isinstance(group["items"], list) for group in tool["parameters"])
    for field in ("id", "title", "slugowner", "slugproject", "description", "seodescription", "image"):
        assert isinstance(tool[field], str), field


@pytest.mark.parametrize(("query", "found"), [
    ({"search": "particalize"}, True),
    ({"search": "Image-to-Video LoRA"}, True),
    ({"search": "text to speech"}, False),
    ({"categories": ["image-to-video"]}, True),
    ({"categories": ["text-to-image", "image-to-video"]}, True),
    ({"categories": ["text-to-image"]}, False),
    ({"categories": "image-to-video,llm"}, True),
    ({"slugowner": "codexq"}, True),
    ({"slugowner": "openai"}, False),
    ({"start": 1}, False),
])
def test_tool_list_honours_search_categories_owner_and_paging(client: TestClient, query: dict, found: bool):
    body = search_models(client, **query)
    assert body["result"] is True
    assert len(body["tool"]) == (1 if found else 0)
    assert body["total"] == ("0" if not found and "start" not in query else "1")


@pytest.mark.parametrize(("search", "found"), [
    ("turn an image into a disintegration video", True),  # Wiro's MCP server: recommend_model(...)
    ("particle effect", True),
    ("image-to-video", True),
    ("Make my photo SHATTER into shards", True),
    ("crystallizing dog", True),
    ("disintegrates", True),
    ("text to speech", False),
    ("transcribe audio to text", False),
    ("upscale an image to 4K", False),
])
def test_tool_list_searches_in_plain_words(client: TestClient, search: str, found: bool):
    body = search_models(client, search=search, limit=10)
    assert body["result"] is True and body["errors"] == []
    assert [t["cleanslugproject"] for t in body["tool"]] == (["particalize"] if found else [])
    assert body["total"] == ("1" if found else "0")


def test_tool_explore_narrows_to_a_search_in_plain_words(client: TestClient):
    (category,) = client.post("/v1/Tool/Explore", json={"search": "disintegration video"}).json()["explore"]
    assert [tool["cleanslugproject"] for tool in category["tools"]] == ["particalize"] and category["total"] == 1
    nothing = client.post("/v1/Tool/Explore", json={"search": "text to speech"}).json()
    assert nothing == {"result": True, "errors": [], "explore": []}


def test_search_terms_drop_stop_words_and_meet_across_word_forms():
    from server.search import terms

    assert terms("Turn an image into a disintegration video") == terms("images disintegrating videos")
    assert terms("particle effects") == terms("Particles, effect!")
    assert terms("the of to a") == []


def test_search_ranks_the_title_above_the_categories_above_the_example_prompts():
    from server.search import Document, rank

    in_title, in_categories, in_prompts = (
        Document.of([([text], weight)]) for text, weight in (("dust", 5.0), ("dust", 3.0), ("dust", 1.0)))
    assert rank("dust storm", [("prompts", in_prompts), ("title", in_title), ("categories", in_categories)]) == [
        "title", "categories", "prompts"]
    assert rank("snow storm", [("title", in_title)]) == [], "no word of the query found"


def test_tool_list_refuses_malformed_filters_saying_what_to_send(client: TestClient):
    answer = client.post("/v1/Tool/List", json={"categories": 5}).json()
    assert answer == {"result": False, "errors": [{
        "code": 0, "message": "Request parameter [categories] must be a list of category names, got '5'."}]}


def test_tool_explore_answers_one_category_holding_this_tool(client: TestClient):
    body = client.post("/v1/Tool/Explore", json={}).json()
    assert body["result"] is True and body["errors"] == []
    (category,) = body["explore"]
    assert category["title"] and category["total"] == 1
    (item,) = category["tools"]
    assert (item["cleanslugowner"], item["cleanslugproject"]) == ("codexq", "particalize")
    assert isinstance(item["categories"], list)
    for field in ("id", "image", "description", "commentcount", "ratedusercount", "averagepoint"):
        assert isinstance(item[field], str), field


def list_tasks(client: TestClient, **extra) -> dict:
    """The body of the client's listTasks({start, limit, model})."""
    body = {"type": "model", "sort": "id", "order": "DESC", "start": "0", "limit": "20", **extra}
    return client.post("/v1/Task/List", json=body).json()


def test_task_list_honours_the_clients_model_name_and_order(client: TestClient):
    ids = [client.post(RUN, json=SMALL).json()["taskid"] for _ in range(3)]
    assert [t["id"] for t in list_tasks(client)["tasklist"]] == ids[::-1]
    for name in ("codexq/Particalize", "particalize", "CODEXQ"):
        assert [t["id"] for t in list_tasks(client, modelName=name)["tasklist"]] == ids[::-1], name
    other = list_tasks(client, modelName="openai/sora-2")
    assert other["result"] is True and other["total"] == "0" and other["tasklist"] == []
    assert [t["id"] for t in list_tasks(client, order="ASC")["tasklist"]] == ids
    assert list_tasks(client, type="workflow")["tasklist"] == []
    bad = list_tasks(client, order="sideways")
    assert bad["errors"][0]["message"] == "Request parameter [order] must be one of desc, asc, got 'sideways'."


def test_tool_detail_lists_the_image_file_and_url_inputs_neither_required_alone(client: TestClient):
    tool = client.post("/v1/Tool/Detail", json={"slugowner": "codexq", "slugproject": "particalize"}).json()["tool"][0]
    items = {item["id"]: item for group in tool["parameters"] for item in group["items"]}
    assert items["inputImage"]["type"] == "fileinput" and items["inputImageUrl"]["type"] == "text"
    assert items["inputImage"]["required"] is False and items["inputImageUrl"]["required"] is False
    assert "one of inputImage and inputImageUrl is needed" in items["inputImage"]["description"]
    assert "one of inputImage and inputImageUrl is needed" in items["inputImageUrl"]["description"]


def test_a_run_records_the_prompt_seed_and_size_it_runs_with(client: TestClient, settings, tiny_generator):
    run = client.post(RUN, json={"inputImageUrl": "http://127.0.0.1:9/dog.png", "numFrames": "9", "steps": "2",
                                 "width": "0", "height": "32"}).json()
    recorded = list_tasks(client)["tasklist"][0]["parameters"]
    assert recorded["prompt"] == DEFAULT_PROMPT and recorded["negativePrompt"] == DEFAULT_NEGATIVE_PROMPT
    assert recorded["seed"].isdigit() and recorded["fps"] == "16" and recorded["scale"] == "5.0"
    assert recorded["numFrames"] == "9" and recorded["width"] == "0", "the inputs as sent"

    services = client.app.state.services
    worker = Worker(services.store, services.storage, tiny_generator, worker_options(settings),
                    worker_id="testnode/gpu0", fetch=lambda url, **kw: (png_bytes(64, 32), "image/png"))
    assert worker.run_once()
    done = client.post("/v1/Task/Detail", json={"taskid": run["taskid"]}).json()["tasklist"][0]
    assert done["pexit"] == "0", done["debugerror"]
    used = done["parameters"]
    assert (used["width"], used["height"]) == ("64", "32"), "the size derived from the image"
    assert used["seed"] == recorded["seed"] and used["prompt"] == DEFAULT_PROMPT
