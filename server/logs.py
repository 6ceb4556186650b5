"""Log output: plain text for people, or one JSON object per line for log collectors (log_format "json").

A JSON line has time (UTC, ISO 8601), level, logger, message, and task_id when the call passed
`extra={"task_id": ...}` (the worker and the callback sender do), so one task's lines can be found in
the logs of every process that touched it.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any, Literal

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        task_id = getattr(record, "task_id", None)
        if task_id is not None:
            entry["task_id"] = str(task_id)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(log_format: Literal["text", "json"] = "text", *, verbose: bool = False) -> None:
    """One stderr handler on the root logger, in the chosen format (replacing any set before)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # Alembic logs one INFO line per plugin as it is imported, before server.store.migrate can quiet it.
    logging.getLogger("alembic").setLevel(logging.WARNING)
