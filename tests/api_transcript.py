"""A fixed script of requests against a real `particalize serve --model tiny`, its answers written as JSON with
ids, tokens, times and sizes replaced by placeholders: run it before and after a refactor and diff the two files
(`python -m tests.api_transcript OUT.json`). It drives the server over HTTP only, so it does not depend on the
code it checks."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

KEY, SECRET = "transcript-key", "transcript-secret"
RUN = "/v1/Run/codexq/Particalize"
SMALL = {"numFrames": "9", "steps": "2", "width": "32", "height": "32", "seed": "7", "fps": "8"}
TIME_KEYS = {"starttime", "endtime", "createtime", "canceltime", "assigntime", "accepttime", "preprocessstarttime",
             "preprocessendtime", "postprocessstarttime", "postprocessendtime", "addedtime", "modifiedtime"}
VOLATILE_KEYS = {"id", "uuid", "taskid", "socketaccesstoken", "tasktoken", "accesskey", "parentid", "url",
                 "elapsedseconds", "size", "totalcost"}


def _signed(nonce: str) -> dict[str, str]:
    import hashlib
    import hmac

    signature = hmac.new(KEY.encode(), (SECRET + nonce).encode(), hashlib.sha256).hexdigest()
    return {"x-api-key": KEY, "x-nonce": nonce, "x-signature": signature}


NONCE = str(int(time.time()))
HEADERS = _signed(NONCE)  # one nonce for every call, as the seed's sample does


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 120, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def _normal(value: Any, key: str = "") -> Any:
    """The answer with what differs from run to run replaced; "0" and "" stay, so a time set or not set shows."""
    if isinstance(value, dict):
        return {k: _normal(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_normal(v, key) for v in value]
    if key in TIME_KEYS | VOLATILE_KEYS and value not in ("0", "", None, 0):
        return f"<{key}>"
    if isinstance(value, str):
        value = re.sub(r"https?://[^\s\"']+", "<url>", value)
        value = re.sub(r"\d+\.\d+", "<float>", value)
        return re.sub(r"\b[0-9a-f]{32}\b|\b[0-9a-f-]{36}\b", "<hex>", value)
    return value


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Transcript:
    def __init__(self, base: str) -> None:
        self.http = httpx.Client(base_url=base, timeout=30)
        self.entries: list[dict[str, Any]] = []

    def post(self, name: str, path: str, headers: dict[str, str] | None = None, **kwargs: Any) -> dict[str, Any]:
        answer = self.http.post(path, headers=HEADERS if headers is None else headers, **kwargs)
        try:
            body: Any = answer.json()
        except ValueError:
            body = answer.text
        self.entries.append({"request": name, "status": answer.status_code, "body": _normal(body)})
        return body if isinstance(body, dict) else {}

    def seed(self, name: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """As the seed's curl: a JSON text labelled multipart/form-data."""
        return self.post(name, path, headers={**HEADERS, "Content-Type": "multipart/form-data"},
                         content=json.dumps(body))

    def wait(self, taskid: str, statuses: tuple[str, ...], timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            task = self.http.post("/v1/Task/Detail", headers=HEADERS, json={"taskid": taskid}).json()["tasklist"][0]
            if task["status"] in statuses:
                return
            time.sleep(0.05)
        raise TimeoutError(f"task {taskid} did not reach {statuses}")


def script(t: Transcript) -> None:
    t.post("tool detail", "/v1/Tool/Detail", json={"slugowner": "codexq", "slugproject": "Particalize"})
    t.post("tool list", "/v1/Tool/List", json={"start": "0", "limit": "20", "search": "particalize"})
    t.post("tool explore", "/v1/Tool/Explore", json={})
    upload = t.post("file upload", "/v1/File/Upload", files={"file": ("dog.png", _png(64, 48), "image/png")})
    image_url = upload["list"][0]["url"]

    done = t.seed("run (seed curl, uploaded url)", RUN, {**SMALL, "inputImageUrl": image_url, "prompt": "a dog"})
    t.wait(done["taskid"], ("task_postprocess_end",))
    t.seed("detail by taskid", "/v1/Task/Detail", {"taskid": done["taskid"]})
    t.seed("detail by tasktoken", "/v1/Task/Detail", {"tasktoken": done["socketaccesstoken"]})
    t.post("run (multipart file)", RUN, data={**SMALL, "prompt": "a cat", "inputImageUrl": ""},
           files={"inputImage": ("cat.png", _png(40, 40), "image/png")})

    running = t.post("run (json, long)", RUN, json={**SMALL, "steps": "100", "numFrames": "81", "width": "48",
                                                    "height": "48", "inputImageUrl": image_url})
    queued = t.post("run (json, queued behind it)", RUN, json={**SMALL, "inputImageUrl": image_url})
    t.wait(running["taskid"], ("task_output",))
    t.seed("cancel a queued task", "/v1/Task/Cancel", {"taskid": queued["taskid"]})
    t.seed("cancel a running task", "/v1/Task/Cancel", {"taskid": running["taskid"]})
    t.seed("kill by socketaccesstoken", "/v1/Task/Kill", {"socketaccesstoken": running["socketaccesstoken"]})
    t.seed("kill a finished task", "/v1/Task/Kill", {"taskid": done["taskid"]})
    t.seed("cancel a finished task", "/v1/Task/Cancel", {"taskid": done["taskid"]})
    t.seed("list", "/v1/Task/List", {"start": "0", "limit": "3"})
    t.seed("input output delete", "/v1/Task/InputOutputDelete", {"taskid": done["taskid"]})
    t.seed("input output delete again", "/v1/Task/InputOutputDelete", {"taskid": done["taskid"]})

    t.seed("bad numFrames", RUN, {**SMALL, "numFrames": "10", "inputImageUrl": image_url})
    t.seed("bad steps", RUN, {**SMALL, "steps": "abc", "inputImageUrl": image_url})
    t.seed("no image", RUN, {**SMALL})
    t.seed("private image url", RUN, {**SMALL, "inputImageUrl": "http://10.0.0.1/dog.png"})
    t.seed("unknown task", "/v1/Task/Detail", {"taskid": "999999"})
    t.seed("no task id", "/v1/Task/Kill", {})
    t.post("not json", RUN, headers={**HEADERS, "Content-Type": "application/json"}, content=b"{not json")
    t.post("bad signature", RUN, headers={**HEADERS, "x-signature": "0" * 64}, json=SMALL)
    t.post("no key", RUN, headers={}, json=SMALL)
    t.post("unknown route", "/v1/Nothing/Here")


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "api-transcript.json")
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="particalize-transcript-") as data:
        env = {**os.environ, "PARTICALIZE_API_KEYS": f"{KEY}:{SECRET}", "PARTICALIZE_MODEL": "tiny",
               "PARTICALIZE_DATA_DIR": data, "PARTICALIZE_PORT": str(port), "PARTICALIZE_ACCESS_LOG": "0",
               "PARTICALIZE_PROGRESS_INTERVAL_SECONDS": "0", "PARTICALIZE_NODE_NAME": "transcript"}
        server = subprocess.Popen([sys.executable, "-m", "particalize.cli", "serve"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=open(Path(data) / "serve.log", "w"))  # noqa: SIM115
        try:
            t = Transcript(f"http://127.0.0.1:{port}")
            deadline = time.monotonic() + 120
            while True:
                try:
                    if t.http.get("/ready").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit((Path(data) / "serve.log").read_text()[-3000:])
                time.sleep(0.2)
            script(t)
        finally:
            server.terminate()
            server.wait(timeout=60)
    out.write_text(json.dumps(t.entries, indent=1, sort_keys=True) + "\n")
    print(f"{len(t.entries)} answers written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
