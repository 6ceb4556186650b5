"""`particalize batch`: many videos from one warm model, resumable, with a manifest and contact sheets.

Jobs already recorded ok (with their MP4 on disk) are skipped, so a run cut short by Ctrl-C or a
crash is finished by running the same command again. A job that fails is recorded and the batch
goes on; the next run retries it.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from particalize.batch_manifest import Manifest
from particalize.batch_plan import BatchInvalid, Job, load_jobs
from particalize.contact_sheet import write_contact_sheet
from particalize.image_source import read_image_source

if TYPE_CHECKING:
    from particalize.settings import Settings
    from pipeline.generator import VideoGenerator

log = logging.getLogger(__name__)


@dataclass
class BatchSummary:
    jobs: int
    skipped: int = 0
    ok: int = 0
    failed: int = 0


def run_job(job: Job, generator: VideoGenerator, out_dir: Path, model: str | None = None) -> dict[str, Any]:
    """Make one job's MP4 and contact sheet; any error becomes a failed record rather than an exception."""
    from pipeline.images import decode_image

    started_at = _now()
    t0 = time.perf_counter()
    params = job.params.with_seed()  # fixed before the run, so even a failed job records its seed
    record: dict[str, Any] = {
        "key": job.key, "line": job.line, "id": job.row_id, "image": job.image, "model": model,
        "sweep": job.sweep, "inputs": job.inputs, "parameters": params.wiro_inputs(),
        "output": None, "contact_sheet": None, "status": "failed", "error": None, "timings": {},
    }
    timings: dict[str, float] = record["timings"]
    try:
        image = decode_image(read_image_source(job.source), field="image")
        timings["load_image"] = time.perf_counter() - t0
        mp4 = out_dir / f"{job.key}.mp4"
        video = generator.render(params, image, mp4)
        timings.update(video.timings)
        record["parameters"] = video.params.wiro_inputs()
        t1 = time.perf_counter()
        sheet = write_contact_sheet(video.frames, out_dir / f"{job.key}.jpg")
        timings["contact_sheet"] = time.perf_counter() - t1
        record.update(status="ok", output=str(mp4), contact_sheet=str(sheet))
    except Exception as exc:  # one bad job must not end a long batch
        log.warning("job %s (line %d) failed: %s", job.key, job.line, exc)
        record["error"] = str(exc) or type(exc).__name__
    timings["total"] = time.perf_counter() - t0
    record["timings"] = {k: round(v, 4) for k, v in timings.items()}
    record.update(started_at=started_at, finished_at=_now())
    return record


def run_batch(
    jobs: list[Job],
    out_dir: Path,
    load_generator: Callable[[], VideoGenerator],
    *,
    model: str | None = None,
    show_progress: bool = True,
) -> BatchSummary:
    """Run the jobs not yet done; the model is loaded (once) only if there is something to do."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(out_dir)
    done = manifest.done_keys()
    pending = [job for job in jobs if job.key not in done]
    summary = BatchSummary(jobs=len(jobs), skipped=len(jobs) - len(pending))
    try:
        if not pending:
            return summary
        generator = load_generator()
        with tqdm(total=len(jobs), initial=summary.skipped, unit="video", desc="batch",
                  disable=not show_progress) as bar:
            for job in pending:
                bar.set_postfix_str(job.key)
                record = run_job(job, generator, out_dir, model)
                manifest.append(record)
                if record["status"] == "ok":
                    summary.ok += 1
                else:
                    summary.failed += 1
                bar.update(1)
        return summary
    finally:
        manifest.write_csv([job.key for job in jobs])


def batch_command(file: Path, out_dir: Path, settings: Settings, defaults: dict[str, Any],
                  prompt_of: Callable[[str], str] | None = None) -> int:
    """The CLI's batch: 0 all done, 1 some jobs failed, 2 invalid rows (nothing run), 130 interrupted.
    `prompt_of`: each job's prompt as the tool runs it (its trigger word put before it)."""
    from particalize import compose

    try:
        jobs = load_jobs(file, compose.limits(settings), defaults)
    except BatchInvalid as exc:
        for problem in exc.problems:
            print(f"{file}: {problem}", file=sys.stderr)
        print(f"error: {len(exc.problems)} problem(s) in {file}; nothing was generated", file=sys.stderr)
        return 2
    if prompt_of is not None:
        jobs = [replace(job, params=job.params.model_copy(update={"prompt": prompt_of(job.params.prompt)}))
                for job in jobs]
    try:
        summary = run_batch(jobs, out_dir, lambda: compose.make_generator(settings), model=settings.model)
    except KeyboardInterrupt:
        print(f"interrupted; run the same command again to finish the rest ({out_dir / 'manifest.jsonl'})",
              file=sys.stderr)
        return 130
    print(json.dumps({**summary.__dict__, "manifest": str(Manifest(out_dir).jsonl)}, indent=2))
    return 1 if summary.failed else 0


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
