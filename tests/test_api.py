"""The HTTP API on SQLite and PostgreSQL: every route, every body style, the exact response shapes,
Wiro's error shapes and statuses, and nothing created by a bad request."""

from __future__ import annotations

import itertools
import json
import string
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from particalize.compose_server import build_app
from particalize.core_options import worker_options
from pipeline.video import read_mp4
from server.auth import sign
from server.worker import Worker
from tests.conftest import make_settings
from tests.images import png_bytes

KEY, SECRET = "test-key", "test-secret"
OTHER_KEY, OTHER_SECRET = "other-key", "other-secret"
PLAIN_KEY = "plain-key"
RUN = "/v1/Run/codexq/Particalize"
SMALL = {"numFrames": "9", "steps": "2", "width": "32", "height": "32", "seed": "7"}
IMAGE_URL = "http://127.0.0.1:9/dog.png"  # never fetched here: no worker runs unless a test starts one

TASK_FIELDS = [
    "id", "uuid", "name", "socketaccesstoken", "parameters", "debugoutput", "debugerror", "starttime", "endtime",
    "elapsedseconds", "status", "cps", "totalcost", "guestid", "projectid", "modelid", "description",
    "basemodelid", "runtype", "modelfolderid", "modelfileid", "callbackurl", "marketplaceid", "createtime",
    "canceltime", "assigntime", "accepttime", "preprocessstarttime", "preprocessendtime", "postprocessstarttime",
    "postprocessendtime", "pexit", "categories", "outputs", "size",
]
OUTPUT_FIELDS = ["id", "name", "contenttype", "parentid", "uuid", "size", "addedtime", "modifiedtime", "accesskey",
                 "foldercount", "filecount", "ispublic", "expiretime", "url"]
TIME_FIELDS = ["starttime", "endtime", "createtime", "canceltime", "assigntime", "accepttime", "preprocessstarttime",
               "preprocessendtime", "postprocessstarttime", "postprocessendtime"]
NOT_STRINGS = {"parameters", "outputs", "guestid", "marketplaceid"}  # as on the published page

_nonces = itertools.count(int(time.time() * 1000))


def signed(key: str = KEY, secret: str = SECRET, nonce: str | None = None) -> dict[str, str]:
    nonce = nonce or str(next(_nonces))
    return {"x-api-key": key, "x-nonce": nonce, "x-signature": sign(key, secret, nonce)}


class Api:
    """Requests as the clients send them: the seed's curl, JSON, urlencoded forms, real multipart."""

    def __init__(self, client: TestClient) -> None:
        self.client = client

    def seed(self, path: str, body: dict[str, Any], headers: dict[str, str] | None = None):
        headers = {**(signed() if headers is None else headers), "Content-Type": "multipart/form-data"}
        return self.client.post(path, content=json.dumps(body), headers=headers)

    def json(self, path: str, body: dict[str, Any], headers: dict[str, str] | None = None):
        return self.client.post(path, json=body, headers=signed() if headers is None else headers)

    def form(self, path: str, body: dict[str, str]):
        return self.client.post(path, data=body, headers=signed())

    def multipart(self, path: str, body: dict[str, str], files: dict[str, tuple[str, bytes, str]]):
        return self.client.post(path, data=body, files=files, headers=signed())

    def detail(self, **ident: str) -> dict[str, Any]:
        answer = self.seed("/v1/Task/Detail", ident)
        assert answer.status_code == 200
        return answer.json()

    def task_count(self) -> int:
        return int(self.json("/v1/Task/List", {"start": "0", "limit": "1"}).json()["total"])


@pytest.fixture
def settings(tmp_path: Path, db_url: str):
    return make_settings(tmp_path, db_url, api_keys=f"{KEY}:{SECRET},{OTHER_KEY}:{OTHER_SECRET},{PLAIN_KEY}:",
                         allow_private_urls=True)


@pytest.fixture
def client(settings) -> TestClient:
    with TestClient(build_app(settings)) as client:
        yield client


@pytest.fixture
def api(client: TestClient) -> Api:
    return Api(client)


def run_worker_once(client: TestClient, settings, generator) -> bool:
    services = client.app.state.services
    worker = Worker(services.store, services.storage, generator, worker_options(settings),
                    worker_id="testnode/gpu0")
    return worker.run_once()


def assert_task_shape(task: dict[str, Any]) -> None:
    assert list(task)[: len(TASK_FIELDS)] == TASK_FIELDS
    for name, value in task.items():
        if name not in NOT_STRINGS:
            assert isinstance(value, str), f"{name} must be a string, got {value!r}"
    for name in TIME_FIELDS:
        assert task[name].isdigit(), name
    assert task["id"].isdigit() and len(task["socketaccesstoken"]) == 30
    float(task["elapsedseconds"])
    assert isinstance(json.loads(task["categories"]), list)
    for out in task["outputs"]:
        assert list(out) == OUTPUT_FIELDS
        assert out["ispublic"] == 0 and out["expiretime"] is None
        assert all(isinstance(out[k], str) for k in OUTPUT_FIELDS if k not in ("ispublic", "expiretime"))


def assert_error(answer, code: int, *, status: int = 200, contains: str = "") -> str:
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert body["result"] is False and set(body) == {"result", "errors"}
    assert len(body["errors"]) == 1 and body["errors"][0]["code"] == code
    message = body["errors"][0]["message"]
    assert contains in message, message
    return message


# --- Run, in every body style ------------------------------------------------------------------------


def test_run_as_the_seeds_curl_sends_it(api: Api):
    body = {"inputImageUrl": IMAGE_URL, "prompt": "a dog is crystallizing", "negativePrompt": "bad quality video",
            "fps": 16, "width": 0, "height": 0, "numFrames": 81, "steps": 30, "scale": "5.0", "flowShift": "5.0"}
    answer = api.seed(RUN, body)
    assert answer.status_code == 200
    run = answer.json()
    assert list(run) == ["errors", "taskid", "socketaccesstoken", "result"]
    assert run["errors"] == [] and run["result"] is True and run["taskid"].isdigit()
    assert len(run["socketaccesstoken"]) == 30
    assert set(run["socketaccesstoken"]) <= set(string.ascii_letters + string.digits)

    by_id = api.detail(taskid=run["taskid"])
    by_token = api.detail(tasktoken=run["socketaccesstoken"])
    assert list(by_id) == ["total", "errors", "tasklist", "result"]
    assert by_id["total"] == "1" and by_id["result"] is True and by_id["errors"] == []
    task = by_id["tasklist"][0]
    assert by_token["tasklist"][0]["id"] == task["id"] == run["taskid"]
    assert_task_shape(task)
    assert task["status"] == "task_queue" and task["pexit"] == "0"
    assert task["createtime"] != "0"
    assert all(task[t] == "0" for t in TIME_FIELDS if t != "createtime"), "times not reached are 0"
    assert task["elapsedseconds"] == "0.0000" and task["outputs"] == [] and task["size"] == "0"
    sent = {k: str(v) for k, v in body.items()}
    assert {k: task["parameters"][k] for k in sent} == sent, "the inputs as sent"
    assert task["parameters"]["seed"].isdigit(), "the seed that will run is chosen and recorded at once"


def test_run_with_json_urlencoded_and_real_multipart(api: Api):
    ids = []
    answer = api.json(RUN, {"inputImageUrl": IMAGE_URL, **SMALL, "scale": 4.5})
    ids.append(answer.json()["taskid"])
    answer = api.form(RUN, {"inputImageUrl": IMAGE_URL, **SMALL})
    ids.append(answer.json()["taskid"])
    answer = api.multipart(RUN, {"inputImageUrl": "", **SMALL}, {"inputImage": ("dog.png", png_bytes(), "image/png")})
    ids.append(answer.json()["taskid"])
    assert all(i.isdigit() for i in ids) and len(set(ids)) == 3
    json_task, form_task, file_task = (api.detail(taskid=i)["tasklist"][0] for i in ids)
    assert json_task["parameters"]["scale"] == "4.5"
    assert form_task["parameters"]["numFrames"] == "9"
    image_url = file_task["parameters"]["inputImage"]
    assert image_url.startswith("http://testserver/files/uploads/") and image_url.endswith("/dog.png")
    served = api.client.get(image_url)
    assert served.status_code == 200 and served.content == png_bytes()
    assert served.headers["content-type"] == "image/png"


def test_a_whole_task_through_the_api_and_its_output(api: Api, settings, tiny_generator):
    run = api.multipart(RUN, SMALL, {"inputImage": ("in.png", png_bytes(40, 40), "image/png")}).json()
    assert run_worker_once(api.client, settings, tiny_generator)
    task = api.detail(tasktoken=run["socketaccesstoken"])["tasklist"][0]
    assert_task_shape(task)
    assert task["status"] == "task_postprocess_end" and task["pexit"] == "0" and task["debugerror"] == ""
    assert all(task[t] != "0" for t in TIME_FIELDS if t != "canceltime") and task["canceltime"] == "0"
    assert task["parameters"]["seed"] == "7" and task["parameters"]["width"] == "32"
    (out,) = task["outputs"]
    assert (out["name"], out["contenttype"], out["uuid"]) == ("0.mp4", "video/mp4", task["uuid"])
    assert out["url"] == f"http://testserver/files/{task['uuid']}/0.mp4" and task["size"] == out["size"]
    video = api.client.get(out["url"])
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    assert len(video.content) == int(out["size"])
    path = Path(settings.outputs_dir) / task["uuid"] / "0.mp4"
    _meta, frames = read_mp4(path)
    assert frames.shape == (9, 32, 32, 3)


# --- errors: shapes and statuses, nothing created -------------------------------------------------------


def test_bad_signature_and_missing_headers_get_401_and_any_integer_nonce_passes(api: Api):
    before = api.task_count()
    body = {"inputImageUrl": IMAGE_URL, **SMALL}
    assert_error(api.seed(RUN, body, headers=signed(secret="wrong")), 0, status=401, contains="x-signature")
    headers = signed()
    assert api.seed("/v1/Task/List", {}, headers=headers).status_code == 200
    assert api.seed("/v1/Task/List", {}, headers=headers).status_code == 200, "a nonce may repeat"
    for nonce in ("1000", "12345", str(time.time_ns())):  # "unix time or any random integer value"
        assert api.seed("/v1/Task/List", {}, headers=signed(nonce=nonce)).json()["result"] is True, nonce
    assert_error(api.seed(RUN, body, headers=signed(secret="wrong", nonce="12345")), 0, status=401,
                 contains="x-signature")
    assert_error(api.seed(RUN, body, headers={}), 0, status=401, contains="x-api-key")
    assert_error(api.seed(RUN, body, headers={"x-api-key": KEY}), 0, status=401, contains="Signed requests")
    assert_error(api.seed(RUN, body, headers={"x-api-key": "unknown"}), 0, status=401)
    assert api.task_count() == before
    assert api.seed(RUN, body, headers={"x-api-key": PLAIN_KEY}).json()["result"] is True, "key-only mode"


def test_the_opt_in_freshness_window_refuses_a_stale_nonce(tmp_path: Path, db_url: str):
    settings = make_settings(tmp_path, db_url, api_keys=f"{KEY}:{SECRET}", allow_private_urls=True,
                             nonce_unit="auto")
    with TestClient(build_app(settings)) as client:
        api = Api(client)
        body = {"inputImageUrl": IMAGE_URL, **SMALL}
        assert_error(api.seed(RUN, body, headers=signed(nonce="1000")), 0, status=401, contains="freshness window")
        assert_error(api.seed(RUN, body, headers=signed(nonce="12345")), 0, status=401, contains="freshness window")
        assert api.seed(RUN, body, headers=signed()).json()["result"] is True, "a fresh millisecond nonce"
        assert api.task_count() == 1


def test_seed_signature_as_openssl_prints_it_is_accepted(api: Api):
    nonce = str(next(_nonces))
    line = f"SHA2-256(stdin)= {sign(KEY, SECRET, nonce)}"
    answer = api.seed("/v1/Task/List", {}, headers={"x-api-key": KEY, "x-nonce": nonce, "x-signature": line})
    assert answer.json()["result"] is True


@pytest.mark.parametrize(
    ("body", "contains"),
    [
        ({**SMALL, "inputImageUrl": IMAGE_URL, "numFrames": "10"}, "[numFrames]"),
        ({**SMALL, "inputImageUrl": IMAGE_URL, "steps": "1000"}, "[steps]"),
        ({**SMALL, "inputImageUrl": IMAGE_URL, "width": "50"}, "[width]"),
        ({**SMALL, "inputImageUrl": IMAGE_URL, "scale": "lots"}, "[scale]"),
        ({**SMALL, "inputImageUrl": IMAGE_URL, "prompt": ["a", "b"]}, "[prompt]"),
        (SMALL, "[inputImageUrl] is required"),
        ({**SMALL, "inputImageUrl": "input-cartoon-dog-2.jpg"}, "[inputImageUrl] must be an http(s) URL"),
        ({**SMALL, "inputImageUrl": "file:///etc/passwd"}, "[inputImageUrl] must be an http(s) URL"),
        ({**SMALL, "inputImageUrl": IMAGE_URL, "callbackUrl": "You can provide a callback URL"}, "[callbackUrl]"),
        ({**SMALL, "inputImageUrl": "http://testserver/files/uploads/" + "0" * 32 + "/x.png"}, "does not exist"),
    ],
    ids=["frames-not-4n+1", "steps-over-limit", "width-not-multiple", "scale-not-number", "prompt-not-text",
         "no-image", "bare-file-name", "file-scheme", "prose-callback", "unknown-upload"],
)
def test_invalid_run_input_is_refused_with_the_field_and_creates_nothing(api: Api, body, contains):
    before = api.task_count()
    assert_error(api.seed(RUN, body), 0, contains=contains)
    assert api.task_count() == before


def test_undecodable_or_oversized_upload_is_refused(api: Api, settings):
    before = api.task_count()
    files = {"inputImage": ("x.png", b"certainly not a png", "image/png")}
    assert_error(api.multipart(RUN, SMALL, files), 0, contains="[inputImage]")
    big = {"inputImage": ("x.png", b"\0" * (settings.max_image_bytes + 1), "image/png")}
    assert_error(api.multipart(RUN, SMALL, big), 0, contains=f"must be at most {settings.max_image_bytes} bytes")
    assert api.task_count() == before


def test_malformed_bodies_get_the_error_shape(api: Api):
    before = api.task_count()
    bad = api.client.post(RUN, content=b'{"prompt": ', headers={**signed(), "Content-Type": "multipart/form-data"})
    assert_error(bad, 0, contains="JSON")
    not_object = api.client.post(RUN, content=b"[1, 2]", headers={**signed(), "Content-Type": "application/json"})
    assert_error(not_object, 0)
    assert api.task_count() == before


def test_private_addresses_are_refused_for_images_and_callbacks(tmp_path: Path, db_url: str):
    settings = make_settings(tmp_path, db_url)  # defaults: no keys (loopback), private URLs refused
    with TestClient(build_app(settings)) as client:
        api = Api(client)
        for url in ("http://127.0.0.1:8000/x.png", "http://169.254.169.254/latest/meta-data",
                    "http://10.0.0.1/x.png", "http://[::1]/x.png", "http://localhost/x.png"):
            assert_error(api.json(RUN, {**SMALL, "inputImageUrl": url}, headers={}), 0,
                         contains="[inputImageUrl] must be a public http(s) URL")
        upload = client.post("/v1/File/Upload", files={"file": ("a.png", png_bytes(), "image/png")}).json()
        ok = {**SMALL, "inputImageUrl": upload["list"][0]["url"]}
        assert_error(api.json(RUN, {**ok, "callbackUrl": "http://127.0.0.1:9/hook"}, headers={}), 0,
                     contains="[callbackUrl] must be a public http(s) URL")
        assert api.task_count() == 0
        assert api.json(RUN, ok, headers={}).json()["result"] is True, "own uploads are read from the store"


def test_unknown_tasks_and_missing_identifiers(api: Api):
    assert_error(api.seed("/v1/Task/Detail", {"taskid": "987654"}), 1, contains="There is no task yet.")
    assert_error(api.seed("/v1/Task/Detail", {"tasktoken": "x" * 30}), 1)
    assert_error(api.seed("/v1/Task/Detail", {}), 0, contains="taskid")
    assert_error(api.seed("/v1/Task/Kill", {"socketaccesstoken": "nope"}), 1)
    assert_error(api.seed("/v1/Task/Cancel", {"taskid": "987654"}), 1)
    assert_error(api.seed("/v1/Run/someone/Else", {"inputImageUrl": IMAGE_URL}), 1, contains="codexq/Particalize")


def test_unknown_routes_answer_404_error_parsing_url(client: TestClient):
    for method, path in (("POST", "/v1/Nope"), ("GET", "/v1/Task/Detail"), ("GET", "/nope"), ("POST", "/v1/Run/x")):
        answer = client.request(method, path, headers=signed())
        assert_error(answer, 0, status=404, contains="Error parsing url.")


def test_unexpected_errors_answer_the_error_shape_not_a_traceback(tmp_path: Path, db_url: str, monkeypatch):
    settings = make_settings(tmp_path, db_url)
    with TestClient(build_app(settings), raise_server_exceptions=False) as client:
        def broken(*args, **kwargs):
            raise RuntimeError("database on fire")

        monkeypatch.setattr(client.app.state.services.store.reads, "find_with_outputs", broken)
        answer = client.post("/v1/Task/Detail", json={"taskid": "1"})
        message = assert_error(answer, 0, status=500, contains="Internal server error")
        assert "fire" not in message and "Traceback" not in answer.text


# --- Cancel and Kill --------------------------------------------------------------------------------------


def test_cancel_removes_a_queued_task(api: Api):
    run = api.seed(RUN, {"inputImageUrl": IMAGE_URL, **SMALL}).json()
    answer = api.seed("/v1/Task/Cancel", {"taskid": run["taskid"]})
    body = answer.json()
    assert list(body) == ["errors", "tasklist", "result"] and body["result"] is True
    task = body["tasklist"][0]
    assert_task_shape(task)
    assert task["status"] == "task_cancel" and task["canceltime"] != "0" and task["accepttime"] == "0"
    assert task["endtime"] == task["canceltime"], "a cancelled task has ended"
    assert_error(api.seed("/v1/Task/Cancel", {"taskid": run["taskid"]}), 1, contains="not in a cancellable state")
    assert_error(api.seed("/v1/Task/Kill", {"taskid": run["taskid"]}), 1, contains="could not be killed")


def test_kill_refuses_a_queued_task_and_cancel_refuses_a_running_one(api: Api):
    run = api.seed(RUN, {"inputImageUrl": IMAGE_URL, **SMALL}).json()
    assert_error(api.seed("/v1/Task/Kill", {"socketaccesstoken": run["socketaccesstoken"]}), 1,
                 contains="Task/Cancel")
    store = api.client.app.state.services.store
    store.tasks.claim_next("testnode/gpu0")
    store.tasks.advance(int(run["taskid"]), "testnode/gpu0", "task_start")
    assert_error(api.seed("/v1/Task/Cancel", {"taskid": run["taskid"]}), 1, contains="Task/Kill")
    started = time.monotonic()
    answer = api.seed("/v1/Task/Kill", {"socketaccesstoken": run["socketaccesstoken"]}).json()
    assert time.monotonic() - started < 1.0, "Kill answers at once; it does not wait for the worker"
    killed = answer["tasklist"][0]
    assert answer["result"] is True and killed["status"] == "task_cancel", "as the seed's Kill answer shows"
    assert killed["endtime"] != "0" and killed["endtime"] == killed["canceltime"] and killed["totalcost"] == "0"
    assert store.tasks.kill_requested(int(run["taskid"]))
    assert api.detail(taskid=run["taskid"])["tasklist"][0]["status"] == "task_cancel"


# --- Task/List, Tool/Detail, File/Upload, InputOutputDelete ------------------------------------------------


def test_task_list_is_newest_first_per_api_key_and_pages(api: Api):
    ids = [api.json(RUN, {"inputImageUrl": IMAGE_URL, **SMALL}).json()["taskid"] for _ in range(3)]
    api.json(RUN, {"inputImageUrl": IMAGE_URL, **SMALL}, headers=signed(OTHER_KEY, OTHER_SECRET))
    body = api.json("/v1/Task/List", {"type": "model", "sort": "id", "order": "DESC", "start": "0", "limit": "20"})
    body = body.json()
    assert list(body) == ["total", "errors", "tasklist", "result"]
    assert body["total"] == "3" and [t["id"] for t in body["tasklist"]] == ids[::-1]
    for task in body["tasklist"]:
        assert_task_shape(task)
    page = api.seed("/v1/Task/List", {"start": 1, "limit": 1}).json()
    assert [t["id"] for t in page["tasklist"]] == [ids[1]] and page["total"] == "3"
    assert_error(api.seed("/v1/Task/List", {"limit": "0"}), 0, contains="[limit]")
    assert_error(api.seed("/v1/Task/List", {"start": "x"}), 0, contains="[start]")
    assert_error(api.seed("/v1/Task/Detail", {"taskid": ids[0]}, headers=signed(OTHER_KEY, OTHER_SECRET)), 1)


def test_tool_detail_describes_the_inputs_defaults_and_limits(api: Api, settings):
    body = api.json("/v1/Tool/Detail", {"slugowner": "codexq", "slugproject": "particalize"}).json()
    assert body["result"] is True and body["errors"] == []
    (tool,) = body["tool"]
    assert (tool["slugowner"], tool["slugproject"]) == ("codexq", "Particalize")
    assert isinstance(tool["categories"], list) and "image-to-video" in tool["categories"]
    items = {item["id"]: item for group in tool["parameters"] for item in group["items"]}
    assert list(items) == ["inputImage", "inputImageUrl", "prompt", "negativePrompt", "fps", "width", "height",
                           "numFrames", "steps", "scale", "flowShift", "seed"]
    assert all(isinstance(item["default"], str) for item in items.values())
    assert items["numFrames"]["default"] == "81" and items["numFrames"]["max"] == settings.max_num_frames
    assert items["steps"]["max"] == settings.max_steps and items["scale"]["default"] == "5.0"
    assert items["negativePrompt"]["default"] == "bad quality video"
    assert_error(api.json("/v1/Tool/Detail", {"slugowner": "x", "slugproject": "y"}), 1)


def test_file_upload_answers_a_url_usable_as_input_image_url(api: Api):
    image = png_bytes(24, 24)
    body = api.multipart("/v1/File/Upload", {}, {"file": ("my dog.png", image, "image/png")}).json()
    assert body["result"] is True
    (item,) = body["list"]
    assert item["name"] == "my-dog.png" and item["contenttype"] == "image/png" and item["size"] == str(len(image))
    fetched = api.client.get(item["url"])
    assert fetched.status_code == 200 and fetched.content == image
    run = api.json(RUN, {**SMALL, "inputImageUrl": item["url"]}).json()
    assert api.detail(taskid=run["taskid"])["tasklist"][0]["parameters"]["inputImageUrl"] == item["url"]
    assert_error(api.multipart("/v1/File/Upload", {}, {"file": ("x.txt", b"hello", "text/plain")}), 0)
    assert_error(api.json("/v1/File/Upload", {}), 0, contains="[file]")


def test_input_output_delete_removes_a_finished_tasks_files_idempotently(api: Api, settings, tiny_generator):
    run = api.multipart(RUN, SMALL, {"inputImage": ("in.png", png_bytes(), "image/png")}).json()
    token = run["socketaccesstoken"]
    assert_error(api.json("/v1/Task/InputOutputDelete", {"tasktoken": token}), 0, contains="completed or cancelled")
    assert run_worker_once(api.client, settings, tiny_generator)
    task = api.detail(taskid=run["taskid"])["tasklist"][0]
    output_url, input_url = task["outputs"][0]["url"], task["parameters"]["inputImage"]
    assert api.client.get(output_url).status_code == 200
    for _ in range(2):
        answer = api.json("/v1/Task/InputOutputDelete", {"tasktoken": token}).json()
        assert answer == {"result": True, "errors": []}
    after = api.detail(taskid=run["taskid"])["tasklist"][0]
    assert after["outputs"] == [] and after["size"] == "0" and after["parameters"] == task["parameters"]
    assert api.client.get(output_url).status_code == 404 and api.client.get(input_url).status_code == 404
    assert_error(api.json("/v1/Task/InputOutputDelete", {"tasktoken": "y" * 30}), 1, contains="task-not-exist")


def test_files_route_serves_nothing_outside_the_outputs(api: Api, settings):
    (Path(settings.outputs_dir)).mkdir(parents=True, exist_ok=True)
    (Path(settings.data_dir) / "secret.txt").write_text("not for you")
    for path in ("/files/../particalize.db", "/files/..%2F..%2Fetc/passwd", "/files/%2e%2e/%2e%2e/etc/passwd",
                 "/files/00000000-0000-0000-0000-000000000000/..", "/files/uploads/../../tasks.db",
                 "/files/00000000-0000-0000-0000-000000000000/.0-tmp.mp4", "/files/../secret.txt",
                 "/files/outputs/../secret.txt", "/files/%2E%2E/secret.txt"):
        answer = api.client.get(path)
        assert answer.status_code == 404, path
        assert "not for you" not in answer.text


def test_without_keys_unsigned_requests_are_served(tmp_path: Path, db_url: str):
    with TestClient(build_app(make_settings(tmp_path, db_url, allow_private_urls=True))) as client:
        run = client.post(RUN, json={"inputImageUrl": IMAGE_URL, **SMALL}).json()
        assert run["result"] is True
        assert client.post("/v1/Task/Detail", data={"taskid": run["taskid"]}).json()["total"] == "1"
