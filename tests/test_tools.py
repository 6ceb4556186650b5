"""The tool catalogue (PARTICALIZE_TOOLS_FILE / --tools): a TOML file of further LoRA tools read strictly, a bad
file refused at start in one line naming the tool and the fix, codexq/Particalize kept as the default tool, and a
Run on each tool's slug recording the tool in the task's record."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from particalize.cli import main
from particalize.compose_server import build_app
from particalize.tools import CatalogueError, read_tools_file, tool_set
from server.task_record import record_of
from server.tool_info import DEFAULT_SLUG, PARTICALIZE
from tests.conftest import make_settings

SMALL = {"inputImageUrl": "http://127.0.0.1:9/dog.png", "numFrames": "9", "steps": "2", "width": "32",
         "height": "32"}


def two_tools(folder: Path) -> str:
    """A catalogue of two effect tools, each with its LoRA file (contents do not matter to the catalogue)."""
    for name in ("squish", "inflate"):
        (folder / f"{name}.safetensors").write_bytes(b"\0" * 16)
    return f"""
[[tools]]
slug = "remade/Squish"
loras = ["{folder / 'squish.safetensors'}:0.9"]
title = "Squish"
description = "Squishes the subject."
tags = ["effect"]
trigger = "sq41sh"

[tools.defaults]
prompt = "a cat is squished"
scale = 6.0

[[tools]]
slug = "remade/Inflate"
loras = ["{folder / 'inflate.safetensors'}"]
inspire = [{{prompt = "a balloon dog inflates"}}]
"""


def write(folder: Path, text: str) -> Path:
    path = folder / "tools.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_without_a_file_the_catalogue_is_particalize_alone(tmp_path: Path):
    tools = tool_set(make_settings(tmp_path))
    assert tools.catalogue.tools == (PARTICALIZE,)
    assert tools.default_from_settings and tools.loras == {DEFAULT_SLUG: ()}


def test_a_two_tool_file_is_read_with_particalize_first(tmp_path: Path):
    path = write(tmp_path, two_tools(tmp_path))
    tools = read_tools_file(path, make_settings(tmp_path))
    assert [tool.slug for tool in tools.catalogue.tools] == [DEFAULT_SLUG, "remade/Squish", "remade/Inflate"]
    squish = tools.catalogue.find("REMADE", "squish")
    assert squish is not None and squish.trigger == "sq41sh" and squish.tags == ("effect",)
    assert squish.defaults == {"prompt": "a cat is squished", "scale": "6.0"}
    assert [(s.path, s.strength) for s in tools.loras["remade/Squish"]] == [(tmp_path / "squish.safetensors", 0.9)]
    inflate = tools.catalogue.find_slug("remade/Inflate")
    assert inflate is not None and inflate.title == "Inflate"
    assert inflate.inspire == ({"prompt": "a balloon dog inflates"},)


def test_a_file_may_describe_particalize_itself(tmp_path: Path):
    (tmp_path / "p.safetensors").write_bytes(b"\0")
    path = write(tmp_path, f'[[tools]]\nslug = "remade/Squish"\nloras = ["{tmp_path / "p.safetensors"}"]\n'
                           f'[[tools]]\nslug = "codexq/Particalize"\nloras = ["{tmp_path / "p.safetensors"}:0.7"]\n')
    tools = read_tools_file(path, make_settings(tmp_path))
    assert tools.catalogue.default.slug == DEFAULT_SLUG and not tools.default_from_settings
    assert [s.strength for s in tools.loras[DEFAULT_SLUG]] == [0.7]


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda t: t.replace('tags = ["effect"]', 'tag = ["effect"]'), "tool 'remade/Squish': tag: unknown key"),
    (lambda t: t.replace("scale = 6.0", "guidance = 6.0"), "tool 'remade/Squish': defaults.guidance: unknown key"),
    (lambda t: t.replace("scale = 6.0", "numFrames = 10"), "tool 'remade/Squish': defaults: Request parameter "
                                                           "[numFrames] must be"),
    (lambda t: t.replace('"remade/Inflate"', '"remade/squish"'), "tool 'remade/squish': the slug is listed twice"),
    (lambda t: t.replace('"remade/Inflate"', '"Inflate"'), "tool 'Inflate': slug: must be 'owner/project'"),
    (lambda t: t.replace('inflate.safetensors"', 'gone.safetensors"'), "tool 'remade/Inflate': loras[0] names "),
    (lambda t: t.replace(":0.9", ":9"), "tool 'remade/Squish': loras[0]: LoRA entry"),
    (lambda t: t.replace('loras = ["', 'loras = [] #'), "tool 'remade/Squish': loras: a tool needs at least one"),
    (lambda t: t + "\n[other]\n", "the file: other: unknown key"),
    (lambda t: t + "\nbroken = [\n", "not valid TOML"),
    (lambda t: "", "the file: tools: Field required"),
])
def test_a_bad_file_is_refused_in_one_line_naming_the_tool(tmp_path: Path, edit, expected: str):
    path = write(tmp_path, edit(two_tools(tmp_path)))
    with pytest.raises(CatalogueError) as refused:
        read_tools_file(path, make_settings(tmp_path))
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    assert expected in message, message


def test_serve_stops_at_start_on_a_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PARTICALIZE_DATA_DIR", str(tmp_path / "data"))
    path = write(tmp_path, two_tools(tmp_path).replace("title =", "titel ="))
    assert main(["serve", "--model", "tiny", "--workers", "0", "--tools", str(path)]) == 2
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("error:")]
    assert lines == [f"error: {path}: tool 'remade/Squish': titel: unknown key (known: slug, loras, title, "
                     "description, readme, categories, tags, trigger, defaults, inspire, request_loras)"]


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'tasks.db'}", allow_private_urls=True,
                             tools_file=write(tmp_path, two_tools(tmp_path)))
    with TestClient(build_app(settings)) as client:
        yield client


def stored_record(client: TestClient, taskid: str):
    store = client.app.state.services.store
    return record_of(store.reads.get(int(taskid)))


def test_a_run_on_each_slug_records_its_tool(client: TestClient):
    for route, slug in [("codexq/Particalize", DEFAULT_SLUG), ("remade/Squish", "remade/Squish"),
                        ("Remade/INFLATE", "remade/Inflate")]:
        body = client.post(f"/v1/Run/{route}", json=SMALL).json()
        assert body["result"] is True, body
        assert stored_record(client, body["taskid"]).tool == slug


def test_a_tools_defaults_and_trigger_apply_where_the_request_says_nothing(client: TestClient):
    body = client.post("/v1/Run/remade/Squish", json=SMALL).json()
    record = stored_record(client, body["taskid"])
    assert record.params.scale == 6.0 and record.params.prompt == "sq41sh a cat is squished"
    sent = client.post("/v1/Run/remade/Squish", json={**SMALL, "scale": "3", "prompt": "SQ41SH a dog"}).json()
    record = stored_record(client, sent["taskid"])
    assert record.params.scale == 3.0 and record.params.prompt == "SQ41SH a dog"
    plain = stored_record(client, client.post("/v1/Run/codexq/Particalize", json=SMALL).json()["taskid"])
    assert plain.params.scale == 5.0


def test_an_unknown_slug_is_refused_in_wiros_shape(client: TestClient):
    answer = client.post("/v1/Run/remade/Explode", json=SMALL)
    assert answer.status_code == 200
    assert answer.json() == {"result": False, "errors": [{
        "code": 1, "message": "There is no tool remade/Explode on this server; it runs codexq/Particalize, "
                              "remade/Squish, remade/Inflate."}]}


def test_tool_list_and_explore_describe_every_tool_with_its_own_defaults(client: TestClient):
    body = client.post("/v1/Tool/List", json={"search": "", "categories": []}).json()
    assert body["total"] == "3"
    by_slug = {f"{t['slugowner']}/{t['slugproject']}": t for t in body["tool"]}
    assert list(by_slug) == [DEFAULT_SLUG, "remade/Squish", "remade/Inflate"]
    assert [t["id"] for t in body["tool"]] == ["1", "2", "3"]
    squish = by_slug["remade/Squish"]
    defaults = {item["id"]: item["default"] for item in squish["parameters"][0]["items"]}
    assert defaults["prompt"] == "a cat is squished" and defaults["scale"] == "6.0" and defaults["steps"] == "30"
    assert squish["description"] == "Squishes the subject." and squish["tags"] == ["effect"]
    found = client.post("/v1/Tool/List", json={"search": "squish"}).json()
    assert [t["slugproject"] for t in found["tool"]] == ["Squish"]
    explore = client.post("/v1/Tool/Explore", json={}).json()["explore"]
    assert [t["slugproject"] for t in explore[0]["tools"]] == ["Particalize", "Squish", "Inflate"]
    assert client.post("/v1/Tool/List", json={"slugowner": "remade"}).json()["total"] == "2"


def test_tool_detail_answers_each_tool_and_refuses_another(client: TestClient):
    detail = client.post("/v1/Tool/Detail", json={"slugowner": "remade", "slugproject": "inflate"}).json()
    assert detail["result"] is True and detail["tool"][0]["slugproject"] == "Inflate"
    assert detail["tool"][0]["inspire"] == [{"prompt": "a balloon dog inflates"}]
    default = client.post("/v1/Tool/Detail", json={}).json()
    assert default["tool"][0]["slugproject"] == "Particalize"
    refused = client.post("/v1/Tool/Detail", json={"slugowner": "remade", "slugproject": "Explode"})
    assert refused.status_code == 200 and refused.json()["errors"][0]["code"] == 1


def test_task_detail_and_list_know_each_tasks_tool(client: TestClient):
    ids = {slug: client.post(f"/v1/Run/{slug}", json=SMALL).json()["taskid"]
           for slug in (DEFAULT_SLUG, "remade/Squish", "remade/Inflate")}
    for slug, taskid in ids.items():
        (task,) = client.post("/v1/Task/Detail", json={"taskid": taskid}).json()["tasklist"]
        assert f"{task['modelslugowner']}/{task['modelslugproject']}" == slug
    squish = client.post("/v1/Task/List", json={"modelName": "remade/squish"}).json()
    assert squish["total"] == "1" and [t["id"] for t in squish["tasklist"]] == [ids["remade/Squish"]]
    remade = client.post("/v1/Task/List", json={"modelName": "remade"}).json()
    assert remade["total"] == "2"
    assert client.post("/v1/Task/List", json={}).json()["total"] == "3"
    assert client.post("/v1/Task/List", json={"modelName": "someone/else"}).json()["total"] == "0"


def test_weights_fetch_fetches_every_tools_hub_loras(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]):
    """A tool's hub LoRA not fetched yet stops the start, naming the fetch command; `weights fetch --tools` fetches
    it (the download itself is weights.fetch's, stubbed here: no network in tests)."""
    import weights.fetch

    monkeypatch.setenv("PARTICALIZE_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.delenv("PARTICALIZE_LORA_PATH", raising=False)
    monkeypatch.delenv("PARTICALIZE_LORAS", raising=False)
    path = write(tmp_path, '[[tools]]\nslug = "remade/Squish"\nloras = ["hf://Remade-AI/Squish/squish.safetensors:0.8"]\n')
    with pytest.raises(CatalogueError, match="run `particalize weights fetch`"):
        read_tools_file(path, make_settings(tmp_path, weights_dir=tmp_path / "weights"))
    fetched = []
    monkeypatch.setattr(weights.fetch, "fetch_lora",
                        lambda repo, file, *args: fetched.append((repo, file)) or tmp_path / file)
    assert main(["weights", "fetch", "--skip-model", "--model", "tiny", "--tools", str(path)]) == 0
    assert fetched == [("Remade-AI/Squish", "squish.safetensors")]
    assert "fetched LoRA hf://Remade-AI/Squish/squish.safetensors" in capsys.readouterr().out
