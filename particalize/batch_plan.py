"""A batch file (JSONL) to jobs: every row checked and every sweep expanded before any model work.

A row is `{"image": path-or-URL, "id": optional, <tool inputs under their Wiro or snake_case names>}`.
`seed`, `scale` and `flowShift` may be lists; the row becomes the cartesian product of its lists.
Relative image paths are read from the batch file's folder, so a batch travels with its images.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import InvalidParameter
from pipeline.params import GenerationParams, Limits, parse_params

SWEEPABLE = ("seed", "scale", "flow_shift", "mode")
"""Fields a row may give as a list, in the order they appear in job keys."""
IMAGE_KEYS = ("image", "inputImageUrl")
_FIELD_OF: dict[str, str] = {}
for _name, _info in GenerationParams.model_fields.items():
    _FIELD_OF[_name] = _name
    if _info.alias:
        _FIELD_OF[_info.alias] = _name
WIRO_NAME = {name: (info.alias or name) for name, info in GenerationParams.model_fields.items()}


@dataclass(frozen=True)
class Job:
    key: str
    """Deterministic name: row id (or line number) plus the swept values; the output is <key>.mp4."""
    line: int
    row_id: str | None
    image: str
    """The image as the row wrote it."""
    source: str
    """What is read: the URL, or the resolved file path."""
    params: GenerationParams
    sweep: dict[str, Any] = field(default_factory=dict)
    """Swept values under their Wiro names."""

    @property
    def inputs(self) -> dict[str, Any]:
        """The requested tool inputs (seed still None when random), under their Wiro names."""
        return {"inputImageUrl": self.image, **self.params.wiro_inputs()}


@dataclass(frozen=True)
class RowProblem:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


class BatchInvalid(ValueError):
    """Some rows are bad; raised with all of them so one edit fixes the file."""

    def __init__(self, problems: list[RowProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class InvalidRow(ValueError):
    """One row's problems (expand_row); load_jobs collects them with line numbers."""

    def __init__(self, messages: list[str]) -> None:
        self.messages = messages
        super().__init__("; ".join(messages))


def load_jobs(path: Path, limits: Limits, defaults: dict[str, Any] | None = None) -> list[Job]:
    """Read, check and expand every row of `path`; raise BatchInvalid listing every bad row."""
    path = Path(path)
    jobs: list[Job] = []
    problems: list[RowProblem] = []
    key_lines: dict[str, int] = {}
    for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            row_jobs = expand_row(line, text, path.parent, limits, defaults or {})
        except InvalidRow as exc:
            problems.extend(RowProblem(line, m) for m in exc.messages)
            continue
        for job in row_jobs:
            if job.key in key_lines:
                problems.append(RowProblem(line, f"job key {job.key!r} is also made by line {key_lines[job.key]}: "
                                                 "give the rows distinct ids"))
                break
            key_lines[job.key] = line
        jobs.extend(row_jobs)
    if problems:
        raise BatchInvalid(problems)
    if not jobs:
        raise BatchInvalid([RowProblem(0, f"{path} has no rows")])
    return jobs


def expand_row(line: int, text: str, base_dir: Path, limits: Limits, defaults: dict[str, Any]) -> list[Job]:
    """One JSONL line to its jobs (one per combination of swept values)."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRow([f"is not valid JSON ({exc.msg} at column {exc.colno})"]) from None
    if not isinstance(row, dict):
        raise InvalidRow(["must be a JSON object"])
    messages: list[str] = []
    image, source = _image_of(row, base_dir, messages)
    row_id = _row_id(row, messages)
    fixed, lists = _fields_of(row, messages)
    if messages:
        raise InvalidRow(messages)

    names = [n for n in SWEEPABLE if n in lists]
    jobs: list[Job] = []
    for combo in itertools.product(*(lists[n] for n in names)):
        swept = dict(zip(names, combo, strict=True))
        try:
            params = parse_params({**defaults, **fixed, **swept}, limits)
        except InvalidParameter as exc:
            raise InvalidRow([str(exc)]) from None
        sweep = {WIRO_NAME[n]: getattr(params, n) for n in names}
        key = _key(row_id or f"line{line}", sweep)
        if any(j.key == key for j in jobs):
            raise InvalidRow([f"the sweep repeats a value (job key {key!r} twice)"])
        jobs.append(Job(key, line, row_id, image, source, params, sweep))
    return jobs


def _image_of(row: dict[str, Any], base_dir: Path, messages: list[str]) -> tuple[str, str]:
    given = [k for k in IMAGE_KEYS if row.get(k) not in (None, "")]
    if len(given) != 1:
        messages.append("needs exactly one of " + " or ".join(f'"{k}"' for k in IMAGE_KEYS) + " (a path or URL)")
        return "", ""
    image = row[given[0]]
    if not isinstance(image, str):
        messages.append(f'"{given[0]}" must be a path or an http(s) URL')
        return "", ""
    if image.startswith(("http://", "https://")):
        return image, image
    path = Path(image).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if not path.is_file():
        messages.append(f"image {image!r} not found (looked at {path})")
    return image, str(path)


def _row_id(row: dict[str, Any], messages: list[str]) -> str | None:
    raw = row.get("id")
    if raw is None or raw == "":
        return None
    if isinstance(raw, bool) or not isinstance(raw, str | int):
        messages.append('"id" must be text or a whole number')
        return None
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(raw)).strip("._")
    if not safe:
        messages.append(f'"id" {raw!r} has no characters usable in a file name')
        return None
    return safe


def _fields_of(row: dict[str, Any], messages: list[str]) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """Row keys to GenerationParams names: fixed values, and the lists to sweep."""
    fixed: dict[str, Any] = {}
    lists: dict[str, list[Any]] = {}
    seen: dict[str, str] = {}
    for key, value in row.items():
        if key in IMAGE_KEYS or key == "id":
            continue
        name = _FIELD_OF.get(key)
        if name is None:
            known = ", ".join(sorted({*WIRO_NAME.values(), *IMAGE_KEYS, "id"}))
            messages.append(f"unknown field {key!r} (known: {known})")
            continue
        if name in seen:
            messages.append(f"{seen[name]!r} and {key!r} name the same input")
            continue
        seen[name] = key
        if isinstance(value, list):
            if name not in SWEEPABLE:
                sweepable = ", ".join(WIRO_NAME[n] for n in SWEEPABLE)
                messages.append(f"{key!r} is a list, but only {sweepable} can be swept")
            elif not value:
                messages.append(f"{key!r} is an empty list")
            else:
                lists[name] = value
        else:
            fixed[name] = value
    return fixed, lists


def _key(base: str, sweep: dict[str, Any]) -> str:
    parts = [base]
    for name, value in sweep.items():
        text = "random" if value is None else (f"{value:g}" if isinstance(value, float) else str(value))
        parts.append(f"{name}{text}")
    return "_".join(parts)
