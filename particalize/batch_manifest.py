"""A batch's record: manifest.jsonl (one line per finished job, appended as it finishes) and manifest.csv.

The JSONL is the source of truth for resuming: each line is written with one O_APPEND write and
fsynced, so an interrupted run leaves whole lines (a torn last line from a crash is skipped on read).
The CSV is a flat view of the newest record per job, rewritten at the end of a run.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANIFEST_JSONL = "manifest.jsonl"
MANIFEST_CSV = "manifest.csv"
PARAM_COLUMNS = ("prompt", "negativePrompt", "fps", "width", "height", "numFrames", "steps", "scale", "flowShift",
                 "seed")
TIMING_COLUMNS = ("load_image", "generate", "encode", "contact_sheet", "total")
CSV_COLUMNS = ("key", "line", "id", "status", "error", "image", "output", "contact_sheet", *PARAM_COLUMNS,
               *(f"{t}_s" for t in TIMING_COLUMNS), "started_at", "finished_at")


class Manifest:
    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.jsonl = self.out_dir / MANIFEST_JSONL
        self.csv = self.out_dir / MANIFEST_CSV

    def records(self) -> list[dict[str, Any]]:
        """Every whole record, oldest first."""
        if not self.jsonl.exists():
            return []
        records = []
        for number, text in enumerate(self.jsonl.read_text(encoding="utf-8").splitlines(), start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                log.warning("%s line %d is not a whole record (an interrupted write?); ignored", self.jsonl, number)
                continue
            if isinstance(record, dict) and "key" in record:
                records.append(record)
        return records

    def latest(self) -> dict[str, dict[str, Any]]:
        """The newest record per job key (a rerun of a failed job supersedes its failure)."""
        return {r["key"]: r for r in self.records()}

    def done_keys(self) -> set[str]:
        """Jobs to skip: recorded ok and their MP4 still on disk."""
        return {key for key, r in self.latest().items()
                if r.get("status") == "ok" and (self.out_dir / f"{key}.mp4").is_file()}

    def append(self, record: dict[str, Any]) -> None:
        """Add one record as a single appended, fsynced line."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, ensure_ascii=False, default=str) + "\n"
        fd = os.open(self.jsonl, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if _ends_without_newline(fd):
                line = "\n" + line  # a crash tore the last line: start ours on a fresh one
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)

    def write_csv(self, order: list[str] | None = None) -> Path:
        """Rewrite manifest.csv: one row per job, in `order` (the batch's job order) first."""
        latest = self.latest()
        keys = [k for k in (order or []) if k in latest] + [k for k in latest if k not in set(order or [])]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".manifest-", suffix=".csv", dir=self.out_dir)
        try:
            with os.fdopen(fd, "w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
                writer.writeheader()
                for key in keys:
                    writer.writerow(flatten(latest[key]))
            os.replace(tmp, self.csv)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return self.csv


def flatten(record: dict[str, Any]) -> dict[str, Any]:
    """One manifest record as a CSV row."""
    row = {c: record.get(c) for c in CSV_COLUMNS}
    params = record.get("parameters") or {}
    row.update({c: params.get(c) for c in PARAM_COLUMNS})
    timings = record.get("timings") or {}
    row.update({f"{t}_s": timings.get(t) for t in TIMING_COLUMNS})
    return {k: ("" if v is None else v) for k, v in row.items()}


def _ends_without_newline(fd: int) -> bool:
    size = os.fstat(fd).st_size
    return size > 0 and os.pread(fd, 1, size - 1) != b"\n"
