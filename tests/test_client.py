"""particalize.client against mocked Wiro answers shaped as the published page shows them."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from particalize.client import (
    AuthError,
    Progress,
    RunResult,
    TaskFailed,
    TaskTimeout,
    WiroClient,
    WiroError,
    parse_progress,
    sign,
)
from tests.images import png_bytes

KEY, SECRET = "pk_3f9a1c", "s3cr3t-Value_42"
BASE = "http://127.0.0.1:8000/v1"

# The seed page's answers (Run, Task/Detail, Task/Kill), verbatim except the Kill TASK's `categories`,
# which the page prints unescaped and is a JSON-encoded string in the real answer.
SEED_RUN = {"errors": [], "taskid": "2221", "socketaccesstoken": "eDcCm5yyUfIvMFspTwww49OUfgXkQt", "result": True}
SEED_DETAIL = {
    "total": "1", "errors": [], "result": True,
    "tasklist": [{
        "id": "2221", "uuid": "15bce51f-442f-4f44-a71d-13c6374a62bd",
        "socketaccesstoken": "eDcCm5yyUfIvMFspTwww49OUfgXkQt", "parameters": {}, "debugoutput": "",
        "debugerror": "", "starttime": "1734513809", "endtime": "1734513813", "elapsedseconds": "6.0000",
        "status": "task_postprocess_end", "createtime": "1734513807", "canceltime": "0",
        "assigntime": "1734513807", "accepttime": "1734513807", "preprocessstarttime": "1734513807",
        "preprocessendtime": "1734513807", "postprocessstarttime": "1734513813", "postprocessendtime": "1734513814",
        "outputs": [{
            "id": "6bc392c93856dfce3a7d1b4261e15af3", "name": "0.png", "contenttype": "image/png",
            "parentid": "6c1833f39da71e6175bf292b18779baf", "uuid": "15bce51f-442f-4f44-a71d-13c6374a62bd",
            "size": "202472", "addedtime": "1734513812", "modifiedtime": "1734513812",
            "accesskey": "dFKlMApaSgMeHKsJyaDeKrefcHahUK",
            "url": "https://cdn1.wiro.ai/6a6af820-c5050aee-40bd7b83-a2e186c6-7f61f7da-3894e49c-fc0eeb66-9b500fe2/0.png",
        }],
        "size": "202472",
    }],
}
SEED_KILL = {
    "errors": [], "result": True,
    "tasklist": [{
        **{k: v for k, v in SEED_DETAIL["tasklist"][0].items() if k != "outputs"},
        "id": "534574", "name": "", "socketaccesstoken": "ZpYote30on42O4jjHXNiKmrWAZqbRE",
        "parameters": {"inputImage": "https://api.wiro.ai/v1/File/mCmUXgZLG1FNjjjwmbtPFr2LVJA112/inputImage-6060136.png"},
        "status": "task_cancel", "cps": "0.000585000000", "totalcost": "0.003510000000", "guestid": None,
        "projectid": "699", "modelid": "598", "description": "", "basemodelid": "0", "runtype": "model",
        "modelfolderid": "", "modelfileid": "", "callbackurl": "", "marketplaceid": None, "pexit": "0",
        "categories": json.dumps(["tool", "image-to-image", "quick-showcase", "compare-landscape"]),
        "outputs": [{**SEED_DETAIL["tasklist"][0]["outputs"][0], "foldercount": "0", "filecount": "0",
                     "ispublic": 0, "expiretime": None}],
    }],
}


def detail_with(**task_fields: Any) -> dict[str, Any]:
    answer = copy.deepcopy(SEED_DETAIL)
    answer["tasklist"][0].update(task_fields)
    return answer


class Api:
    """A MockTransport that records requests and answers from a route -> responder table."""

    def __init__(self, routes: dict[str, Any]) -> None:
        self.routes = routes
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        answer = self.routes.get(request.url.path)
        if answer is None:
            return httpx.Response(404, json={"result": False, "errors": [{"code": 0, "message": "Error parsing url."}]})
        if callable(answer):
            answer = answer(request)
        if isinstance(answer, httpx.Response):
            return answer
        return httpx.Response(200, json=answer)

    def bodies(self, path: str) -> list[Any]:
        return [json.loads(r.content) for r in self.requests if r.url.path == path]


def client_for(api: Api, secret: str | None = SECRET) -> WiroClient:
    return WiroClient(KEY, secret, base_url=BASE, transport=httpx.MockTransport(api))


def sequence(*answers: Any) -> Callable[[httpx.Request], Any]:
    """Answers in turn; the last one repeats."""
    remaining = list(answers)

    def answer(request: httpx.Request) -> Any:
        return remaining.pop(0) if len(remaining) > 1 else remaining[0]

    return answer


def openssl_signature(key: str, secret: str, nonce: str) -> str:
    """The seed page's shell: printf the secret and nonce into openssl's HMAC, keep the hex."""
    result = subprocess.run(
        ["bash", "-c", 'printf \'%s\' "${SECRET}${NONCE}" | openssl dgst -sha256 -hmac "${KEY}"'],
        env={"KEY": key, "SECRET": secret, "NONCE": nonce, "PATH": "/usr/bin:/bin:/usr/local/bin"},
        capture_output=True, text=True, check=True,
    )
    return result.stdout.split()[-1]  # "SHA2-256(stdin)= <hex>" (OpenSSL 3) or "(stdin)= <hex>" (1.1)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
@pytest.mark.parametrize("nonce", ["1734513807", "1734513807123", "42"])
def test_signature_is_the_one_the_seed_shell_computes(nonce):
    assert sign(KEY, SECRET, nonce) == openssl_signature(KEY, SECRET, nonce)


def test_every_request_is_signed_with_a_fresh_millisecond_nonce():
    api = Api({"/v1/Run/codexq/Particalize": SEED_RUN, "/v1/Task/Detail": SEED_DETAIL})
    client = client_for(api)
    before = int(time.time() * 1000)
    client.run({"prompt": "x"}, image_url="https://example.com/a.png")
    client.detail("2221")
    client.detail(tasktoken="eDcCm5yyUfIvMFspTwww49OUfgXkQt")
    after = int(time.time() * 1000)
    nonces = [int(r.headers["x-nonce"]) for r in api.requests]
    assert len(nonces) == 3 and nonces == sorted(set(nonces)), "one new, increasing nonce per request"
    assert before <= nonces[0] and nonces[-1] <= after + 3, "unix time in milliseconds"
    for request in api.requests:
        assert request.method == "POST"
        assert request.headers["x-api-key"] == KEY
        assert request.headers["x-signature"] == sign(KEY, SECRET, request.headers["x-nonce"])
        assert len(request.headers["x-signature"]) == 64


def test_a_key_without_secret_sends_only_the_key():
    api = Api({"/v1/Task/Detail": SEED_DETAIL})
    client_for(api, secret=None).detail("2221")
    headers = api.requests[0].headers
    assert headers["x-api-key"] == KEY and "x-nonce" not in headers and "x-signature" not in headers


def test_run_sends_json_inputs_and_returns_the_task_handles():
    api = Api({"/v1/Run/codexq/Particalize": SEED_RUN})
    result = client_for(api).run({"prompt": "dust", "numFrames": 5, "scale": "5.0"},
                                 image_url="https://example.com/dog.jpg", callback_url="https://example.com/cb")
    assert result == RunResult("2221", "eDcCm5yyUfIvMFspTwww49OUfgXkQt")
    request = api.requests[0]
    assert str(request.url) == f"{BASE}/Run/codexq/Particalize"
    assert request.headers["content-type"] == "application/json"
    assert json.loads(request.content) == {"prompt": "dust", "numFrames": 5, "scale": "5.0",
                                           "inputImageUrl": "https://example.com/dog.jpg",
                                           "callbackUrl": "https://example.com/cb"}


@pytest.mark.parametrize("as_path", [False, True], ids=["bytes", "path"])
def test_run_with_an_image_sends_multipart_with_an_inputImage_file(tmp_path, as_path):
    image = png_bytes(8, 8)
    (tmp_path / "dog.png").write_bytes(image)
    api = Api({"/v1/Run/codexq/Particalize": SEED_RUN})
    client_for(api).run({"numFrames": 5, "scale": 4.5, "prompt": "shards"},
                        image=tmp_path / "dog.png" if as_path else image)
    request = api.requests[0]
    assert request.headers["content-type"].startswith("multipart/form-data; boundary=")
    body = request.content
    name = "dog.png" if as_path else "inputImage.png"
    assert f'name="inputImage"; filename="{name}"\r\nContent-Type: image/png\r\n\r\n'.encode() + image in body
    for field, value in (("numFrames", "5"), ("scale", "4.5"), ("prompt", "shards")):
        assert f'name="{field}"\r\n\r\n{value}\r\n'.encode() in body
    assert b'name="inputImageUrl"' not in body


def test_detail_takes_an_id_or_a_token_and_returns_the_task():
    api = Api({"/v1/Task/Detail": SEED_DETAIL})
    client = client_for(api)
    assert client.detail("2221") == SEED_DETAIL["tasklist"][0]
    assert client.detail(tasktoken="eDcCm5yyUfIvMFspTwww49OUfgXkQt")["id"] == "2221"
    assert api.bodies("/v1/Task/Detail") == [{"taskid": "2221"}, {"tasktoken": "eDcCm5yyUfIvMFspTwww49OUfgXkQt"}]
    with pytest.raises(ValueError):
        client.detail()


def test_kill_and_cancel_send_the_identifiers_the_official_client_sends():
    api = Api({"/v1/Task/Kill": SEED_KILL, "/v1/Task/Cancel": SEED_KILL, "/v1/Task/Detail": SEED_DETAIL})
    client = client_for(api)
    assert client.kill(socketaccesstoken="ZpYote30on42O4jjHXNiKmrWAZqbRE")["status"] == "task_cancel"
    assert client.kill(534574)["id"] == "534574"
    assert api.bodies("/v1/Task/Kill") == [{"socketaccesstoken": "ZpYote30on42O4jjHXNiKmrWAZqbRE"},
                                           {"taskid": "534574"}]
    client.cancel(tasktoken="eDcCm5yyUfIvMFspTwww49OUfgXkQt")  # Cancel needs an id: resolved through Detail
    assert api.bodies("/v1/Task/Cancel") == [{"taskid": "2221"}]
    assert api.bodies("/v1/Task/Detail") == [{"tasktoken": "eDcCm5yyUfIvMFspTwww49OUfgXkQt"}]


def test_wait_polls_past_task_error_to_the_end_and_reports_progress():
    api = Api({"/v1/Task/Detail": sequence(
        detail_with(status="task_queue", outputs=[], debugoutput=""),
        detail_with(status="task_output", outputs=[], debugoutput="step 3/30 (10%), 1.20 it/s, elapsed 2.5s"),
        detail_with(status="task_output", outputs=[], debugoutput="step 3/30 (10%), 1.20 it/s, elapsed 2.5s"),
        detail_with(status="task_error", outputs=[], debugoutput="step 3/30 (10%)", debugerror="warning"),
        detail_with(status="task_output", outputs=[], debugoutput=json.dumps(
            {"type": "progressGenerate", "percentage": "60", "stepCurrent": "18", "stepTotal": "30"})),
        SEED_DETAIL,
    )})
    seen: list[Progress] = []
    task = client_for(api).wait("2221", poll_interval=0, timeout=10, on_progress=seen.append)
    assert task == SEED_DETAIL["tasklist"][0]
    assert len(api.requests) == 6
    assert [(p.status, p.step, p.total, p.percentage) for p in seen] == [
        ("task_queue", None, None, None),
        ("task_output", 3, 30, 10.0),  # an unchanged poll is not reported twice
        ("task_error", 3, 30, 10.0),
        ("task_output", 18, 30, 60.0),
        ("task_postprocess_end", None, None, 100.0),
    ]


def test_wait_raises_task_failed_with_the_debugerror():
    failed = detail_with(pexit="1", outputs=[], debugerror="Request parameter [inputImageUrl] could not be fetched")
    api = Api({"/v1/Task/Detail": failed})
    with pytest.raises(TaskFailed) as info:
        client_for(api).wait("2221", poll_interval=0)
    assert info.value.pexit == "1" and "could not be fetched" in info.value.debugerror
    assert info.value.task["id"] == "2221"


def test_a_cancelled_task_is_terminal():
    api = Api({"/v1/Task/Detail": sequence(detail_with(status="task_start"), SEED_KILL)})
    assert client_for(api).wait("534574", poll_interval=0)["status"] == "task_cancel"


def test_wait_times_out_with_the_last_task_seen():
    api = Api({"/v1/Task/Detail": detail_with(status="task_start")})
    started = time.monotonic()
    with pytest.raises(TaskTimeout) as info:
        client_for(api).wait("2221", poll_interval=0.05, timeout=0.3)
    assert time.monotonic() - started < 2
    assert info.value.task["status"] == "task_start" and len(api.requests) >= 2


def test_wait_retries_transient_trouble_but_not_auth_errors():
    flaky = sequence(
        httpx.Response(503, text="busy"),
        {"result": False, "errors": [{"code": 1, "message": "There is no task yet."}]},
        httpx.Response(429, json={"result": False, "errors": []}),
        SEED_DETAIL,
    )
    api = Api({"/v1/Task/Detail": flaky})
    assert client_for(api).wait("2221", poll_interval=0)["status"] == "task_postprocess_end"
    assert len(api.requests) == 4

    always_down = Api({"/v1/Task/Detail": httpx.Response(502, text="bad gateway")})
    with pytest.raises(WiroError) as info:
        client_for(always_down).wait("2221", poll_interval=0, max_errors=3)
    assert info.value.status_code == 502 and len(always_down.requests) == 3

    denied = Api({"/v1/Task/Detail": httpx.Response(401, json={
        "result": False, "errors": [{"code": 0, "message": "Project authorization is not valid."}]})})
    with pytest.raises(AuthError):
        client_for(denied).wait("2221", poll_interval=0)
    assert len(denied.requests) == 1


def test_errors_are_mapped():
    api = Api({
        "/v1/Task/Detail": {"result": False, "errors": [{"code": 1, "message": "There is no task yet."}]},
        "/v1/Task/Kill": httpx.Response(401, json={"result": False, "errors": [
            {"code": 0, "message": "Project requires signature authentication. x-signature and x-nonce headers are "
                                   "required."}]}),
        "/v1/Task/Cancel": httpx.Response(200, text="<html>oops</html>"),
        "/v1/Run/codexq/Particalize": {"result": False, "errors": [
            {"code": 0, "message": "Request parameter [numFrames] must be 4*n + 1"}]},
    })
    client = client_for(api)
    with pytest.raises(WiroError) as info:
        client.detail("9")
    assert (info.value.code, info.value.message, type(info.value)) == (1, "There is no task yet.", WiroError)
    with pytest.raises(AuthError) as auth:
        client.kill("9")
    assert auth.value.status_code == 401 and "x-signature" in auth.value.message
    with pytest.raises(WiroError, match="not JSON"):
        client.cancel("9")
    with pytest.raises(WiroError, match=r"\[numFrames\]") as bad:
        client.run({"numFrames": 6}, image_url="https://example.com/a.png")
    assert bad.value.code == 0
    with pytest.raises(WiroError, match="Error parsing url") as missing:
        client.run({}, model="someone/Else")
    assert missing.value.status_code == 404


def test_download_saves_every_output_under_its_name(tmp_path):
    cdn = SEED_DETAIL["tasklist"][0]["outputs"][0]["url"]
    payloads = {cdn: b"\x89PNG video bytes", "http://127.0.0.1:8000/files/t/evil.mp4": b"mp4 bytes"}

    def files(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=payloads[str(request.url)]) if str(request.url) in payloads \
            else httpx.Response(404)

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return files(request)
        return httpx.Response(200, json=SEED_DETAIL)

    client = WiroClient(KEY, SECRET, base_url=BASE, transport=httpx.MockTransport(handler))
    task = client.detail("2221")
    task["outputs"].append({"name": "../evil.mp4", "url": "/files/t/evil.mp4"})
    paths = client.download(task, tmp_path / "dl")
    assert paths == [tmp_path / "dl" / "0.png", tmp_path / "dl" / "evil.mp4"]
    assert [p.read_bytes() for p in paths] == [b"\x89PNG video bytes", b"mp4 bytes"]
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == ["0.png", "evil.mp4"], "no temp files left"

    task["outputs"] = [{"name": "gone.mp4", "url": "https://cdn1.wiro.ai/gone.mp4"}]
    with pytest.raises(WiroError) as info:
        client.download(task, tmp_path / "dl2")
    assert info.value.status_code == 404 and not list((tmp_path / "dl2").iterdir())


@pytest.mark.parametrize(
    ("debugoutput", "status", "expected"),
    [
        ("step 15/30 (50%), 1.50 it/s, elapsed 10.0s, remaining 10.0s", "task_output", (15, 30, 50.0)),
        (" 40%|####      | 12/30 [00:08<00:12,  1.50it/s]", "task_output", (12, 30, 40.0)),
        ('{"type":"progressGenerate","percentage":"60","stepCurrent":"6","stepTotal":"10"}', "task_output",
         (6, 10, 60.0)),
        ("step 3 of 4", "task_output", (3, 4, 75.0)),
        ("input image 40x40; video 32x32, 5 frames, 2 steps, seed 7", "task_preprocess_end", (None, None, None)),
        ("done: 0.mp4 (1234 bytes)", "task_postprocess_end", (None, None, 100.0)),
    ],
)
def test_progress_is_read_from_debugoutput(debugoutput, status, expected):
    progress = parse_progress({"status": status, "debugoutput": debugoutput, "pexit": "0"})
    assert (progress.step, progress.total, progress.percentage) == expected
    assert progress.status == status
