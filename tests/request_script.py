"""A fixed script of requests and CLI calls whose answers, ids and times aside, must not change across a
refactoring: run it before and after, then diff the two files.

    python -m tests.request_script OUT.json

Every answer is recorded with the values that differ run to run (ids, tokens, uuids, times, nonces, temporary
paths) replaced by placeholders. It runs on the tiny preset, SQLite and a temporary directory.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from server.auth import sign
from tests.conftest import make_settings
from tests.images import png_bytes

RUN = "/v1/Run/codexq/Particalize"
KEY, SECRET = "script-key", "script-secret"
SMALL = {"numFrames": "9", "steps": "2", "width": "32", "height": "32", "seed": "7"}
_VOLATILE = {"id", "uuid", "taskid", "socketaccesstoken", "accesskey", "heartbeat", "pid", "seed", "elapsedseconds",
             "totalcost", "addedtime", "modifiedtime", "createtime", "starttime", "endtime", "canceltime",
             "assigntime", "accepttime", "preprocessstarttime", "preprocessendtime", "postprocessstarttime",
             "postprocessendtime", "debugoutput", "size", "version", "load_seconds", "parentid"}
_PATTERNS = [
    (re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"), "<uuid>"),
    (re.compile(r"/files/uploads/[0-9a-f]{32}/"), "/files/uploads/<upload>/"),
    (re.compile(r"/tmp/[^\s'\"]+"), "<tmp>"),
    (re.compile(r"\b\d{10,13}\b"), "<time>"),
    (re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"), "<utc>"),
    (re.compile(r"\d+\.\d+s\b"), "<seconds>"),
    (re.compile(r"retry in \d+ seconds"), "retry in <n> seconds"),
]


def _app(settings: Any) -> Any:
    try:
        from particalize.compose_server import build_app
    except ImportError:  # before the redesign
        from server.app import create_app as build_app
    return build_app(settings)


def normalized(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: normalized(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [normalized(v, key) for v in value]
    if key in _VOLATILE and value not in (None, "", "0"):
        return f"<{key}>"
    if isinstance(value, str):
        for pattern, placeholder in _PATTERNS:
            value = pattern.sub(placeholder, value)
    return value


def _record(log: list[Any], name: str, response: Any) -> Any:
    try:
        body = response.json()
    except ValueError:
        body = {"bytes": len(response.content)}
    headers = {k: v for k, v in response.headers.items() if k in ("retry-after", "content-type")}
    log.append({"step": name, "status": response.status_code, "headers": headers, "body": normalized(body)})
    return body


def api_script(root: Path, log: list[Any]) -> None:
    from server.worker import Worker

    settings_of = make_settings

    def tiny_generator() -> Any:
        from pipeline.generator import VideoGenerator
        from pipeline.presets import get_preset

        try:
            from pipeline.generator import GeneratorOptions
        except ImportError:
            return VideoGenerator(get_preset("tiny"), weights_dir=root / "weights")
        return VideoGenerator(GeneratorOptions(get_preset("tiny"), root / "weights"))

    generator = tiny_generator()
    configs = {
        "open": settings_of(root / "open", f"sqlite:///{root / 'open.db'}", allow_private_urls=True),
        "keyed": settings_of(root / "keyed", f"sqlite:///{root / 'keyed.db'}", api_keys=f"{KEY}:{SECRET},plain:",
                             allow_private_urls=False, rate_limit_per_minute=40, cost_per_second=0.002),
        "fast": settings_of(root / "fast", f"sqlite:///{root / 'fast.db'}", speed_lora="/models/4step.safetensors",
                            mode="fast", fast_steps=6, max_num_frames=49, max_steps=60, max_side=1024,
                            max_pixels=512 * 512, max_work=10**9, max_image_bytes=4096 * 1024),
    }
    nonce = itertools.count(int(time.time() * 1000))

    def signed() -> dict[str, str]:
        n = str(next(nonce))
        return {"x-api-key": KEY, "x-nonce": n, "x-signature": sign(KEY, SECRET, n)}

    for name, settings in configs.items():
        headers = signed if name == "keyed" else dict
        with TestClient(_app(settings)) as client:
            def post(step: str, path: str, client: TestClient = client, headers: Any = headers, name: str = name,
                     **kw: Any) -> Any:
                return _record(log, f"{name}: {step}", client.post(path, headers=headers(), **kw))

            for step, path, body in [
                ("detail", "/v1/Tool/Detail", {"slugowner": "codexq", "slugproject": "particalize"}),
                ("detail unknown", "/v1/Tool/Detail", {"slugowner": "x", "slugproject": "y"}),
                ("list", "/v1/Tool/List", {"search": "particalize"}),
                ("list none", "/v1/Tool/List", {"search": "speech"}),
                ("explore", "/v1/Tool/Explore", {}),
            ]:
                post(step, path, json=body)
            _record(log, f"{name}: openapi", client.get("/openapi.json"))
            _record(log, f"{name}: playground config", client.get("/playground/config.json"))
            _record(log, f"{name}: unknown route", client.post("/v1/Nope", json={}))
            for field, value in [("numFrames", "10"), ("width", "50"), ("steps", "0"), ("scale", "nan"),
                                 ("flowShift", "-1"), ("seed", "-2"), ("mode", "fast"), ("mode", "slow"),
                                 ("fps", "61"), ("prompt", 5), ("numFrames", "161"), ("width", "4096"),
                                 ("steps", "101")]:
                post(f"run {field}={value}", RUN, json={"inputImageUrl": "http://127.0.0.1:9/a.png", **SMALL,
                                                         field: value})
            post("run no image", RUN, json=SMALL)
            post("run wrong tool", "/v1/Run/x/y", json=SMALL)
            post("run private url", RUN, json={**SMALL, "inputImageUrl": "http://10.0.0.1/a.png"})
            post("run bad callback", RUN, json={**SMALL, "inputImageUrl": "http://127.0.0.1:9/a.png",
                                                "callbackUrl": "You can provide a callback URL"})
            post("upload", "/v1/File/Upload", files={"file": ("my dog.png", png_bytes(24, 24), "image/png")})
            post("upload text", "/v1/File/Upload", files={"file": ("x.txt", b"hello", "text/plain")})
            run = post("run multipart", RUN, data=SMALL, files={"inputImage": ("in.png", png_bytes(), "image/png")})
            queued = post("run json", RUN, json={**SMALL, "inputImageUrl": "http://127.0.0.1:9/a.png"})
            post("detail queued", "/v1/Task/Detail", json={"taskid": queued.get("taskid", "0")})
            post("cancel", "/v1/Task/Cancel", json={"taskid": queued.get("taskid", "0")})
            post("kill cancelled", "/v1/Task/Kill", json={"taskid": queued.get("taskid", "0")})
            post("list tasks", "/v1/Task/List", json={"start": "0", "limit": "20"})
            if run.get("result"):
                services = client.app.state.services
                worker = Worker(services.store, services.storage, generator, settings, worker_id="script/gpu0")
                for _ in range(4):  # the tasks queued before it run (or fail) first
                    worker.run_once()
                done = post("detail done", "/v1/Task/Detail", json={"taskid": run["taskid"]})
                output = done["tasklist"][0]["outputs"]
                if output:
                    _record(log, f"{name}: output", client.get(output[0]["url"].replace("http://testserver", "")))
                post("delete files", "/v1/Task/InputOutputDelete",
                     json={"tasktoken": run["socketaccesstoken"]})
            _record(log, f"{name}: health", client.get("/health"))
            _record(log, f"{name}: ready", client.get("/ready"))
            _record(log, f"{name}: healthz", client.get("/healthz"))
            if name == "keyed":
                for step, hdrs in [("no key", {}), ("bad signature", {"x-api-key": KEY, "x-nonce": "1", "x-signature":
                                                                      "00"}),
                                   ("plain key", {"x-api-key": "plain"}),
                                   ("stale nonce", {"x-api-key": KEY, "x-nonce": "1000",
                                                    "x-signature": sign(KEY, SECRET, "1000")})]:
                    _record(log, f"{name}: {step}", client.post("/v1/Tool/Explore", json={}, headers=hdrs))
                for _ in range(45):
                    answer = client.post("/v1/Tool/Explore", json={}, headers=signed())
                    if answer.json()["result"] is False:
                        _record(log, f"{name}: rate limited", answer)
                        break


def cli_script(root: Path, log: list[Any]) -> None:
    from particalize.cli import build_parser, main

    parser = build_parser()
    for command in (["generate"], ["batch"], ["serve"], ["worker"], ["weights", "fetch"], ["weights", "verify"],
                    ["keys", "create"]):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            parser.parse_args([*command, "--help"])
        log.append({"step": f"cli help {' '.join(command)}", "text": out.getvalue()})
    png = root / "in.png"
    png.write_bytes(png_bytes(40, 60))
    for step, argv in [
        ("generate", ["generate", "--model", "tiny", "--image", str(png), "--out", str(root / "o.mp4"),
                      "--num-frames", "5", "--steps", "1", "--seed", "3", "--fps", "8", "--flow-shift", "3",
                      "--negative-prompt", "blurry", "--scale", "4", "--width", "32"]),
        ("generate bad", ["generate", "--model", "tiny", "--image", str(png), "--num-frames", "10"]),
        ("weights verify tiny", ["weights", "verify", "--model", "tiny"]),
    ]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
        text = out.getvalue()
        with contextlib.suppress(ValueError):
            parsed = json.loads(text)
            parsed.pop("timings", None)
            text = json.dumps(normalized(parsed), indent=1)
        log.append({"step": f"cli {step}", "code": code, "stdout": normalized(text),
                    "stderr": [line for line in err.getvalue().splitlines() if line.startswith("error")]})


def main(out: str) -> None:
    log: list[Any] = []
    with tempfile.TemporaryDirectory() as tmp:
        api_script(Path(tmp), log)
        cli_script(Path(tmp), log)
    Path(out).write_text(json.dumps(log, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    print(f"{len(log)} answers written to {out}")


if __name__ == "__main__":
    main(sys.argv[1])
