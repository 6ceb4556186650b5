"""Progress as people and Wiro clients read it, rendered from the numbers the store records: Task/Detail's
debugoutput while a task denoises, and the messages Wiro's socket sends (one translation of a task's recorded
events, shared by the WebSocket and Server-Sent Events, for the replay a late client gets and live events alike).

The worker records each progress write as a task_output event with its step, total and time; the socket's speed,
elapsed and remaining time follow from those times and the task_start event before them, so a replay says what
the live stream said.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from server.store.models import OUTPUT, POSTPROCESS_END, START, TaskEvent

OutputsOf = Callable[[], tuple[str, list[dict[str, Any]]]]
"""(pexit, output dicts) of the task, read when its task_postprocess_end is sent."""


def progress_text(step: int, total: int, elapsed: float) -> str:
    """debugoutput while a task denoises: 'step 3/30 (10%), 1.52 it/s, elapsed 2.0s, remaining 17.8s'."""
    rate = step / elapsed if elapsed > 0 else 0.0
    speed = f"{rate:.2f} it/s" if rate >= 1 else f"{(1 / rate if rate else 0.0):.2f} s/it"
    remaining = (total - step) / rate if rate else 0.0
    percentage = 100.0 * step / total if total else 100.0
    return (f"step {step}/{total} ({percentage:.0f}%), {speed}, elapsed {elapsed:.1f}s, "
            f"remaining {remaining:.1f}s")


def duration_text(seconds: float) -> str:
    """Wiro-style short durations: '0.4s', '12s', '3m05s'."""
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes}m{rest:02d}s"


def progress_object(step: int, total: int, elapsed: float) -> dict[str, str]:
    """The task_output message: every value a string, as Wiro sends them."""
    rate = step / elapsed if elapsed > 0 else 0.0
    if rate >= 1:
        speed, kind = rate, "it/s"
    else:
        speed, kind = (1 / rate if rate else 0.0), "s/it"
    remaining = (total - step) / rate if rate else 0.0
    return {
        "type": "progressGenerate",
        "task": "Generate",
        "percentage": str(round(100 * step / total)),
        "stepCurrent": str(step),
        "stepTotal": str(total),
        "speed": f"{speed:.2f}",
        "speedType": kind,
        "elapsedTime": duration_text(elapsed),
        "remainingTime": duration_text(remaining),
    }


def error_message(text: str) -> dict[str, Any]:
    """What an unknown or malformed registration gets before the socket closes."""
    return {"type": "task_info", "result": False, "message": text}


class SocketMessages:
    """Turns one task's events, fed in id order, into socket messages (it remembers the task_start time)."""

    def __init__(self, task_id: int, token: str) -> None:
        self.task_id = task_id
        self.token = token
        self.started_at: float | None = None

    def message(self, event: TaskEvent, outputs_of: OutputsOf) -> dict[str, Any]:
        body: dict[str, Any] = {"type": event.status, "id": str(self.task_id), "tasktoken": self.token,
                                "message": None, "result": True}
        if event.status == START:
            self.started_at = event.at
        elif event.status == OUTPUT:
            if event.step is not None and event.total:
                elapsed = event.at - self.started_at if self.started_at is not None else 0.0
                body["message"] = progress_object(event.step, event.total, elapsed)
            elif event.message:
                body["message"] = event.message
        elif event.status == POSTPROCESS_END:
            pexit, outputs = outputs_of()
            body["message"] = outputs
            body["success"] = pexit == "0" and bool(outputs)
            body["exitCode"] = int(pexit) if pexit.lstrip("-").isdigit() else 1
        return body
