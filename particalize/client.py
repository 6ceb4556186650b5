"""A small typed client for the Wiro task API: the hosted service and this server differ only in base URL.

It follows Wiro's official client (wiroai/Wiro-MCP src/client.ts): every call is a POST under /v1,
signed with x-api-key, x-nonce (unix milliseconds, fresh per request) and
x-signature = hex(HMAC-SHA256(key=api_key, msg=api_secret + nonce)); `result: false` is an error even
with HTTP 200; polling stops only at task_postprocess_end or task_cancel.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import httpx

DEFAULT_BASE_URL = "https://api.wiro.ai/v1"
DEFAULT_MODEL = "codexq/Particalize"
TERMINAL_STATUSES = frozenset({"task_postprocess_end", "task_cancel"})
"""As the newest official client: task_error is not terminal (the task still ends in one of these)."""
RETRYABLE_HTTP = frozenset({408, 429})
WAIT_TIMEOUT_SECONDS = 1800.0
"""wait()'s default: a real GPU video takes minutes (a 480P step of the 14B model is ~6.6 s on an H200, a 720P
step ~23 s: 30 steps are 3.3 to 11.5 minutes), plus any queue; 30 minutes leaves room for both."""

ImageInput = bytes | str | os.PathLike


class WiroError(Exception):
    """The API said no: `result: false`, a non-2xx answer, or a body that is not the API's JSON."""

    def __init__(self, code: int | None, message: str, status_code: int | None = None) -> None:
        self.code = code
        self.message = message
        self.status_code = status_code
        super().__init__(f"[{code}] {message}" if code is not None else message)


class AuthError(WiroError):
    """HTTP 401: wrong key, secret or signature (or, where the operator turned the freshness window on, a nonce
    outside it: check the clock)."""


class TaskFailed(WiroError):
    """The task ended with pexit != "0"; `debugerror` says why."""

    def __init__(self, task: dict[str, Any]) -> None:
        self.task = task
        self.pexit = str(task.get("pexit", ""))
        self.debugerror = str(task.get("debugerror") or "")
        reason = self.debugerror or "no debugerror given"
        super().__init__(None, f"task {task.get('id')} failed (pexit {self.pexit}): {reason}")


class TaskTimeout(WiroError, TimeoutError):
    """wait() ran out of time; `task` is the last state seen (None if no poll succeeded)."""

    def __init__(self, task: dict[str, Any] | None, timeout: float) -> None:
        self.task = task
        status = task.get("status") if task else "unknown"
        super().__init__(None, f"task not finished after {timeout:g}s (last status: {status})")


@dataclass(frozen=True)
class RunResult:
    taskid: str
    socketaccesstoken: str


@dataclass(frozen=True)
class Progress:
    """What on_progress receives: the status and, while denoising, how far it is."""

    status: str
    percentage: float | None = None
    step: int | None = None
    total: int | None = None
    task: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


def sign(api_key: str, api_secret: str, nonce: str) -> str:
    """hex(HMAC-SHA256(key=api_key, msg=api_secret + nonce)), as Wiro's docs and client compute it."""
    return hmac.new(api_key.encode(), (api_secret + nonce).encode(), hashlib.sha256).hexdigest()


def parse_progress(task: Mapping[str, Any]) -> Progress:
    """Progress from a TASK: a progress object in debugoutput, else the last 'N/M' or 'P%' in it."""
    status = str(task.get("status", ""))
    text = str(task.get("debugoutput") or "")
    step = total = None
    percentage = None
    for obj in reversed(_json_objects(text)):
        if "percentage" in obj or "stepCurrent" in obj:
            percentage = _number(obj.get("percentage"))
            step, total = _int(obj.get("stepCurrent")), _int(obj.get("stepTotal"))
            break
    else:
        steps = re.findall(r"(\d+)\s*(?:/|of)\s*(\d+)", text)
        if steps:
            step, total = int(steps[-1][0]), int(steps[-1][1])
        percents = re.findall(r"(\d+(?:\.\d+)?)\s*%", text)
        if percents:
            percentage = float(percents[-1])
    if percentage is None and step is not None and total:
        percentage = 100.0 * step / total
    if status == "task_postprocess_end" and str(task.get("pexit", "0")) == "0":
        percentage = 100.0
    return Progress(status, percentage, step, total, dict(task))


class WiroClient:
    """One API key (and secret) against one base URL; a context manager that closes its connections."""

    def __init__(
        self,
        api_key: str,
        api_secret: str | None = None,
        base_url: str = DEFAULT_BASE_URL,
        timeout: float = 60.0,
        *,
        model: str = DEFAULT_MODEL,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.api_key = api_key
        self.api_secret = api_secret or None
        self.base_url = base_url.rstrip("/")
        self.model = model.strip("/")
        self._http = httpx.Client(timeout=timeout, transport=transport, follow_redirects=True)
        self._nonce_lock = threading.Lock()
        self._last_nonce = 0

    @classmethod
    def from_env(cls, **kwargs: Any) -> WiroClient:
        """WIRO_API_KEY, WIRO_API_SECRET and WIRO_BASE_URL (optional) from the environment."""
        base = os.environ.get("WIRO_BASE_URL") or DEFAULT_BASE_URL
        return cls(os.environ["WIRO_API_KEY"], os.environ.get("WIRO_API_SECRET"), base, **kwargs)

    def __enter__(self) -> WiroClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- the routes -----------------------------------------------------------------------------

    def run(
        self,
        inputs: Mapping[str, Any] | None = None,
        image: ImageInput | None = None,
        image_url: str | None = None,
        callback_url: str | None = None,
        *,
        model: str | None = None,
    ) -> RunResult:
        """Start a task. `image` (bytes or a file path) is uploaded as the `inputImage` file part."""
        if image is not None and image_url is not None:
            raise ValueError("give image or image_url, not both")
        body = dict(inputs or {})
        if image_url is not None:
            body["inputImageUrl"] = image_url
        if callback_url is not None:
            body["callbackUrl"] = callback_url
        path = f"/Run/{(model or self.model).strip('/')}"
        if image is None:
            answer = self._post(path, json=body)
        else:
            form = {k: _form_value(v) for k, v in body.items() if v is not None}
            answer = self._post(path, data=form, files={"inputImage": _file_part(image)})
        try:
            return RunResult(str(answer["taskid"]), str(answer["socketaccesstoken"]))
        except KeyError as exc:
            raise WiroError(None, f"Run answered without {exc.args[0]}: {_short(answer)}") from None

    def detail(self, taskid: str | int | None = None, tasktoken: str | None = None) -> dict[str, Any]:
        """The TASK (tasklist[0]) by id or by socket access token."""
        body = _ids(taskid=taskid, tasktoken=tasktoken)
        if not body:
            raise ValueError("give taskid or tasktoken")
        return self._task(self._post("/Task/Detail", json=body))

    def kill(self, taskid: str | int | None = None, socketaccesstoken: str | None = None) -> dict[str, Any]:
        """Stop a running task (it ends in task_cancel); returns the TASK."""
        body = _ids(taskid=taskid) or _ids(socketaccesstoken=socketaccesstoken)
        if not body:
            raise ValueError("give taskid or socketaccesstoken")
        return self._task(self._post("/Task/Kill", json=body))

    def cancel(self, taskid: str | int | None = None, tasktoken: str | None = None) -> dict[str, Any]:
        """Remove a queued task. Cancel takes a taskid: a token is resolved through Detail first."""
        if taskid is None:
            if tasktoken is None:
                raise ValueError("give taskid or tasktoken")
            taskid = self.detail(tasktoken=tasktoken)["id"]
        return self._task(self._post("/Task/Cancel", json={"taskid": str(taskid)}))

    def wait(
        self,
        taskid: str | int | None = None,
        *,
        tasktoken: str | None = None,
        poll_interval: float | None = None,
        timeout: float = WAIT_TIMEOUT_SECONDS,
        on_progress: Callable[[Progress], None] | None = None,
        max_errors: int = 5,
    ) -> dict[str, Any]:
        """Poll Detail until the task is terminal; return the TASK or raise TaskFailed / TaskTimeout.

        poll_interval None is the official client's schedule: 2s for 15s, then 5s until 60s, then 10s.
        Transient trouble (network, 5xx, 408, 429, `result: false`) is retried up to max_errors in a row.
        """
        started = time.monotonic()
        deadline = started + timeout
        last: dict[str, Any] | None = None
        reported: tuple[Any, ...] | None = None
        errors = 0
        while True:
            try:
                task = self.detail(taskid=taskid, tasktoken=tasktoken)
            except (WiroError, httpx.TransportError) as exc:
                if not _retryable(exc):
                    raise
                errors += 1
                if errors >= max_errors:
                    raise
            else:
                errors = 0
                last = task
                if on_progress is not None:
                    progress = parse_progress(task)
                    if (progress.status, progress.step, progress.percentage) != reported:
                        reported = (progress.status, progress.step, progress.percentage)
                        on_progress(progress)
                if task.get("status") in TERMINAL_STATUSES:
                    if str(task.get("pexit", "0")) != "0":
                        raise TaskFailed(task)
                    return task
            now = time.monotonic()
            if now >= deadline:
                raise TaskTimeout(last, timeout)
            interval = poll_interval if poll_interval is not None else _default_interval(now - started)
            time.sleep(max(0.0, min(interval, deadline - now)))

    def download(self, task: Mapping[str, Any], dest_dir: str | os.PathLike) -> list[Path]:
        """Fetch every output's url into dest_dir, named as the output is named; returns the paths."""
        dest = Path(dest_dir)
        dest.mkdir(parents=True, exist_ok=True)
        paths: list[Path] = []
        for index, output in enumerate(task.get("outputs") or []):
            url = urljoin(self.base_url + "/", str(output["url"]))
            name = _safe_name(str(output.get("name") or ""), url, index)
            if any(p.name == name for p in paths):
                name = f"{index}-{name}"
            paths.append(self._fetch(url, dest / name))
        return paths

    # --- transport ------------------------------------------------------------------------------

    def auth_headers(self) -> dict[str, str]:
        """x-api-key, and with a secret a fresh x-nonce and its x-signature."""
        headers = {"x-api-key": self.api_key}
        if self.api_secret is not None:
            nonce = self._next_nonce()
            headers["x-nonce"] = nonce
            headers["x-signature"] = sign(self.api_key, self.api_secret, nonce)
        return headers

    def _next_nonce(self) -> str:
        # Unix milliseconds like the official client, but strictly increasing: two calls in one
        # millisecond would otherwise share a nonce and the second be refused as a replay.
        with self._nonce_lock:
            self._last_nonce = max(int(time.time() * 1000), self._last_nonce + 1)
            return str(self._last_nonce)

    def _post(self, path: str, **kwargs: Any) -> dict[str, Any]:
        response = self._http.post(self.base_url + path, headers=self.auth_headers(), **kwargs)
        return _answer(response)

    def _task(self, answer: dict[str, Any]) -> dict[str, Any]:
        tasks = answer.get("tasklist") or []
        if not tasks or not isinstance(tasks[0], dict):
            raise WiroError(1, "There is no task yet.")
        return tasks[0]

    def _fetch(self, url: str, path: Path) -> Path:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle, self._http.stream("GET", url) as response:
                if not response.is_success:
                    response.read()
                    raise WiroError(None, f"download of {url} answered HTTP {response.status_code}",
                                    response.status_code)
                for chunk in response.iter_bytes():
                    handle.write(chunk)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


def _answer(response: httpx.Response) -> dict[str, Any]:
    """The JSON body of a successful call; every other outcome as a WiroError."""
    try:
        body = response.json()
    except ValueError:
        body = None
    code, message = _first_error(body)
    status = response.status_code
    if status == 401:
        raise AuthError(code, message or "authentication failed", status)
    if not response.is_success:
        raise WiroError(code, message or f"HTTP {status}: {response.text[:200]}", status)
    if not isinstance(body, dict):
        raise WiroError(None, f"the answer is not JSON: {response.text[:200]!r}", status)
    if body.get("result") is not True:
        raise WiroError(code, message or f"the call failed: {_short(body)}", status)
    return body


def _first_error(body: Any) -> tuple[int | None, str]:
    errors = body.get("errors") if isinstance(body, dict) else None
    if not errors:
        return None, ""
    first = errors[0]
    if not isinstance(first, dict):
        return None, str(first)
    return _int(first.get("code")), str(first.get("message", ""))


def _retryable(exc: Exception) -> bool:
    if isinstance(exc, httpx.TransportError):
        return True
    if isinstance(exc, AuthError) or not isinstance(exc, WiroError):
        return False
    status = exc.status_code
    return status is None or status < 300 or status >= 500 or status in RETRYABLE_HTTP


def _default_interval(elapsed: float) -> float:
    return 2.0 if elapsed < 15 else 5.0 if elapsed < 60 else 10.0


def _ids(**given: str | int | None) -> dict[str, str]:
    return {k: str(v) for k, v in given.items() if v is not None and v != ""}


def _form_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _file_part(image: ImageInput) -> tuple[str, bytes, str]:
    if isinstance(image, bytes | bytearray):
        data = bytes(image)
        name = "inputImage"
    else:
        path = Path(image).expanduser()
        data, name = path.read_bytes(), path.name
    kind, ext = _sniff(data)
    if "." not in name:
        name += ext
    return name, data, kind


def _sniff(data: bytes) -> tuple[str, str]:
    if data.startswith(b"\x89PNG"):
        return "image/png", ".png"
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg", ".jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp", ".webp"
    return "application/octet-stream", ""


def _safe_name(name: str, url: str, index: int) -> str:
    """An output's file name without any directory part (a name like ../x must not escape dest_dir)."""
    for candidate in (name, unquote(urlsplit(url).path.rsplit("/", 1)[-1])):
        base = Path(candidate.replace("\\", "/")).name
        if base not in ("", ".", ".."):
            return base
    return f"output-{index}"


def _json_objects(text: str) -> list[dict[str, Any]]:
    """JSON objects in a log: the whole text, or one per line."""
    candidates = [text, *text.splitlines()]
    found: list[dict[str, Any]] = []
    for candidate in candidates:
        candidate = candidate.strip()
        if not candidate.startswith(("{", "[")):
            continue
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        found.extend(v for v in (value if isinstance(value, list) else [value]) if isinstance(v, dict))
    return found


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _int(value: Any) -> int | None:
    number = _number(value)
    return int(number) if number is not None else None


def _short(body: Any) -> str:
    return json.dumps(body)[:200]
