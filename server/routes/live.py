"""Live task progress: Wiro's socket protocol at /ws (and /v1/ws), and the same messages as Server-Sent
Events at GET /v1/Task/Events?tasktoken=... for browsers and curl.

Socket: the client sends {"type": "task_info", "tasktoken": "<socketaccesstoken>"}; the server sends
every recorded event of the task (a late client catches up), then each new one, and closes after
task_postprocess_end or task_cancel. The token is the capability, as on Wiro: no API key is asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, WebSocket
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.websockets import WebSocketDisconnect, WebSocketState

from server.live import SLOTS, TaskFollower, TooManyFollowers, find_by_token
from server.progress import error_message
from server.routes.common import services_of

router = APIRouter()

REGISTER_TIMEOUT_SECONDS = 30.0
NORMAL_CLOSURE = 1000
POLICY_VIOLATION = 1008
TRY_AGAIN_LATER = 1013
UNKNOWN_TOKEN = "There is no task for this tasktoken (send the socketaccesstoken Run answered)."


def registration_token(text: str) -> str | None:
    """The tasktoken of a {"type": "task_info", "tasktoken": ...} message, or None."""
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: JSON nested past the parser's depth limit
        return None
    if not isinstance(body, dict) or body.get("type") != "task_info":
        return None
    token = body.get("tasktoken") or body.get("socketaccesstoken")
    return token.strip() if isinstance(token, str) else None


async def _watch_disconnect(ws: WebSocket, gone: asyncio.Event) -> None:
    """Reads (and ignores) what the client sends after registering, to notice when it leaves."""
    try:
        while True:
            if (await ws.receive())["type"] == "websocket.disconnect":
                return
    except (WebSocketDisconnect, RuntimeError):
        return
    finally:
        gone.set()


async def _refuse(ws: WebSocket, text: str, code: int) -> None:
    with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
        await ws.send_json(error_message(text))
        await ws.close(code)


@router.websocket("/ws")
@router.websocket("/v1/ws")
async def task_socket(ws: WebSocket) -> None:
    await ws.accept()
    try:
        first = await asyncio.wait_for(ws.receive_text(), timeout=REGISTER_TIMEOUT_SECONDS)
    except asyncio.TimeoutError:
        await _refuse(ws, "Send {\"type\": \"task_info\", \"tasktoken\": \"<socketaccesstoken>\"} first.",
                      POLICY_VIOLATION)
        return
    except (WebSocketDisconnect, RuntimeError, KeyError):
        return
    token = registration_token(first)
    if token is None:
        await _refuse(ws, "Expected {\"type\": \"task_info\", \"tasktoken\": \"<socketaccesstoken>\"}.",
                      POLICY_VIOLATION)
        return
    services = ws.app.state.services
    task = await run_in_threadpool(find_by_token, services, token)
    if task is None:
        await _refuse(ws, UNKNOWN_TOKEN, POLICY_VIOLATION)
        return
    try:
        SLOTS.take()
    except TooManyFollowers as exc:
        await _refuse(ws, str(exc), TRY_AGAIN_LATER)
        return
    gone = asyncio.Event()
    watcher = asyncio.create_task(_watch_disconnect(ws, gone))
    try:
        async for item in TaskFollower(services, task, ws.app.state.live_feed).events(gone):
            if item is not None:
                await ws.send_json(item.message)
        if ws.client_state == WebSocketState.CONNECTED:
            await ws.close(NORMAL_CLOSURE)
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass  # the client left while we were sending
    finally:
        SLOTS.give()
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


def _resume_after(request: Request) -> int:
    """EventSource sends the last id it got when it reconnects: resume after it."""
    last = (request.headers.get("last-event-id") or "").strip()
    return int(last) if last.isdigit() and len(last) < 19 else 0


@router.get("/v1/Task/Events")
async def task_events(request: Request, tasktoken: str = "", socketaccesstoken: str = "") -> Response:
    """The socket's messages as text/event-stream: one `id:` + `data: <json>` per event, keep-alive
    comments while idle, the stream ends after the terminal event. Unknown token: HTTP 404 with the
    socket's error message as JSON."""
    services = services_of(request)
    token = (tasktoken or socketaccesstoken).strip()
    task = await run_in_threadpool(find_by_token, services, token)
    if task is None:
        return JSONResponse(error_message(UNKNOWN_TOKEN), status_code=404)
    if SLOTS.full:
        return JSONResponse(error_message(SLOTS.refusal), status_code=503)
    follower = TaskFollower(services, task, request.app.state.live_feed, after_id=_resume_after(request))

    async def stream() -> AsyncIterator[str]:
        SLOTS.take(check=False)  # checked above; counted here so a body that never starts holds no slot
        try:
            yield "retry: 2000\n\n"
            async for item in follower.events():
                if item is None:
                    yield ": keep-alive\n\n"
                    continue
                data = json.dumps(item.message, separators=(",", ":"))
                yield f"id: {item.event_id}\ndata: {data}\n\n"
        finally:
            SLOTS.give()

    headers: dict[str, Any] = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)
