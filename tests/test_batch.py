"""`particalize batch`: sweeps, validation before work, the manifest, resuming and contact sheets (tiny model)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from particalize.batch import run_batch
from particalize.batch_manifest import Manifest
from particalize.batch_plan import load_jobs
from particalize.compose import make_generator
from particalize.settings import Settings
from pipeline.generator import VideoGenerator
from pipeline.params import Limits
from pipeline.video import read_mp4
from tests.images import noise_image

SMALL = {"width": 32, "height": 32, "numFrames": 5, "steps": 1}


@pytest.fixture(scope="module")
def gen(tmp_path_factory: pytest.TempPathFactory) -> VideoGenerator:
    return make_generator(Settings(model="tiny", weights_dir=tmp_path_factory.mktemp("weights")))


def write_batch(folder: Path, rows: list[dict[str, Any] | str]) -> Path:
    """A batch file next to a start image `in.png`; a str row is written verbatim."""
    noise_image(40, 40).save(folder / "in.png")
    path = folder / "batch.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def jobs_of(path: Path) -> list:
    return load_jobs(path, Limits())


class Spy:
    """Wraps generator.generate: counts the calls, and can raise Ctrl-C on a given call."""

    def __init__(self, gen: VideoGenerator, interrupt_at: int | None = None) -> None:
        self.real = type(gen).generate.__get__(gen)  # the unpatched method, even if another Spy is installed
        self.interrupt_at = interrupt_at
        self.seeds: list[int | None] = []

    def __call__(self, params, image, **kw):
        if self.interrupt_at is not None and len(self.seeds) + 1 == self.interrupt_at:
            raise KeyboardInterrupt
        self.seeds.append(params.seed)
        return self.real(params, image, **kw)


def must_not_load() -> VideoGenerator:
    raise AssertionError("the model was loaded although nothing was left to do")


def test_sweeps_expand_into_the_product_with_deterministic_keys(tmp_path):
    path = write_batch(tmp_path, [
        {"id": "dog", "image": "in.png", "seed": [1, 2, 3], "scale": [4, "5.0"], **SMALL},
        {"image": "in.png", "flowShift": [1.5, 3], "seed": 7, **SMALL},
        {"image": str(tmp_path / "in.png"), **SMALL},
    ])
    jobs = jobs_of(path)
    assert [j.key for j in jobs] == [
        "dog_seed1_scale4", "dog_seed1_scale5", "dog_seed2_scale4", "dog_seed2_scale5", "dog_seed3_scale4",
        "dog_seed3_scale5", "line2_flowShift1.5", "line2_flowShift3", "line3",
    ]
    assert [j.key for j in jobs_of(path)] == [j.key for j in jobs], "keys do not depend on the run"
    assert {(j.params.seed, j.params.scale) for j in jobs[:6]} == {(s, c) for s in (1, 2, 3) for c in (4.0, 5.0)}
    assert [j.params.flow_shift for j in jobs[6:8]] == [1.5, 3.0]
    assert all(j.params.seed == 7 for j in jobs[6:8])
    assert jobs[8].params.seed is None, "no seed in the row: random, fixed when the job runs"
    assert jobs[0].source == str(tmp_path / "in.png"), "relative paths are read from the batch file's folder"
    assert jobs[0].sweep == {"seed": 1, "scale": 4.0}


def test_tool_flags_are_defaults_and_rows_win(tmp_path):
    path = write_batch(tmp_path, [{"image": "in.png", "steps": 3}, {"image": "in.png", "num_frames": 9}])
    jobs = load_jobs(path, Limits(), {"steps": "2", "num_frames": "5", "prompt": "dust"})
    assert [(j.params.steps, j.params.num_frames, j.params.prompt) for j in jobs] == [(3, 5, "dust"), (2, 9, "dust")]


def test_every_invalid_row_is_reported_with_its_line_before_anything_runs(tmp_path, monkeypatch, capsys):
    import particalize.compose as compose
    from particalize.cli import main

    monkeypatch.setattr(compose, "make_generator",
                        lambda *a, **k: pytest.fail("the model was loaded for an invalid batch"))
    path = write_batch(tmp_path, [
        {"image": "in.png", **SMALL},                           # 1 fine
        {"image": "in.png", **SMALL, "numFrames": 6},           # 2 not 4n+1
        {"image": "missing.png", **SMALL},                      # 3 no such file
        '{"image": "in.png", ',                                 # 4 not JSON
        {"image": "in.png", "sed": 3},                          # 5 typo
        {"image": "in.png", "steps": [1, 2]},                   # 6 steps cannot be swept
        "",                                                     # 7 blank lines are skipped
        {"id": "a", "image": "in.png"},                         # 8
        {"id": "a", "image": "in.png"},                         # 9 same key as line 8
        {"prompt": "no image"},                                 # 10
        {"image": "in.png", "seed": [1, 1]},                    # 11 sweep repeats a value
        {"image": "in.png", "seed": [3, -5]},                   # 12 one bad value in a sweep
    ])
    out = tmp_path / "out"
    code = main(["batch", str(path), "--out", str(out), "--model", "tiny"])
    assert code == 2
    err = capsys.readouterr().err
    bad = {2: "[numFrames]", 3: "missing.png", 4: "not valid JSON", 5: "unknown field 'sed'",
           6: "only seed, scale, flowShift, mode can be swept", 9: "also made by line 8", 10: "needs exactly one of",
           11: "repeats a value", 12: "[seed]"}
    reported = {int(m[1]): m[2] for m in re.finditer(r"batch\.jsonl: line (\d+): (.*)", err)}
    assert sorted(reported) == sorted(bad), "every bad row, and only those"
    for line, text in bad.items():
        assert text in reported[line], (line, reported[line])
    assert "nothing was generated" in err
    assert not out.exists() or not any(out.iterdir())


def test_batch_makes_videos_sheets_and_a_manifest_line_per_job(gen, tmp_path):
    path = write_batch(tmp_path, [
        {"id": "sweep", "image": "in.png", "seed": [11, 12], "prompt": "glass", **SMALL},
        {"image": "in.png", **SMALL, "fps": 8},
    ])
    out = tmp_path / "out"
    summary = run_batch(jobs_of(path), out, lambda: gen, model="tiny", show_progress=False)
    assert (summary.jobs, summary.ok, summary.failed, summary.skipped) == (3, 3, 0, 0)

    lines = (out / "manifest.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["key"] for r in records] == ["sweep_seed11", "sweep_seed12", "line2"]
    for r in records:
        assert r["status"] == "ok" and r["error"] is None
        assert {"inputs", "parameters", "timings", "output", "contact_sheet", "started_at", "finished_at",
                "line", "id", "image", "model"} <= r.keys()
        p = r["parameters"]
        assert (p["width"], p["height"], p["numFrames"], p["steps"]) == (32, 32, 5, 1)
        assert isinstance(p["seed"], int) and 0 <= p["seed"] < 2**32
        assert r["timings"]["generate"] > 0 and r["timings"]["total"] >= r["timings"]["generate"]
        assert r["output"] == str(out / f"{r['key']}.mp4")
        meta, frames = read_mp4(Path(r["output"]))
        assert frames.shape == (5, 32, 32, 3) and meta["fps"] == p["fps"]
    assert [r["parameters"]["seed"] for r in records[:2]] == [11, 12]
    assert records[2]["inputs"]["seed"] is None, "requested: random; parameters hold the one used"
    assert records[0]["parameters"]["prompt"] == "glass" and records[0]["sweep"] == {"seed": 11}
    assert records[2]["id"] is None and records[2]["line"] == 2 and records[2]["parameters"]["fps"] == 8

    with open(out / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["key"], row["status"], row["seed"], row["width"]) for row in rows] == [
        (r["key"], "ok", str(r["parameters"]["seed"]), "32") for r in records
    ]


def test_contact_sheet_is_first_middle_last_frame_side_by_side(gen, tmp_path):
    path = write_batch(tmp_path, [{"id": "v", "image": "in.png", "seed": 3, **SMALL, "width": 48}])
    out = tmp_path / "out"
    run_batch(jobs_of(path), out, lambda: gen, show_progress=False)
    sheet = Image.open(out / "v.jpg")
    assert sheet.format == "JPEG" and sheet.size == (3 * 48, 32)
    _, frames = read_mp4(out / "v.mp4")
    panels = np.asarray(sheet.convert("RGB"), dtype=np.float32).reshape(32, 3, 48, 3).transpose(1, 0, 2, 3)
    for panel, index in zip(panels, (0, 2, 4), strict=True):
        errors = [np.abs(panel - frames[i].astype(np.float32)).mean() for i in range(5)]
        assert errors[index] < 12, f"panel for frame {index} does not look like it ({errors})"


def test_a_rerun_after_an_interrupt_generates_only_the_rest(gen, tmp_path, monkeypatch):
    path = write_batch(tmp_path, [{"id": "r", "image": "in.png", "seed": [1, 2, 3, 4, 5], **SMALL}])
    jobs, out = jobs_of(path), tmp_path / "out"

    first = Spy(gen, interrupt_at=3)  # Ctrl-C while the third job starts
    monkeypatch.setattr(gen, "generate", first)
    with pytest.raises(KeyboardInterrupt):
        run_batch(jobs, out, lambda: gen, show_progress=False)
    assert first.seeds == [1, 2]
    assert [r["key"] for r in Manifest(out).records()] == ["r_seed1", "r_seed2"]
    assert len((out / "manifest.csv").read_text().splitlines()) == 3, "the CSV is written even when interrupted"
    assert sorted(p.name for p in out.glob("*.mp4")) == ["r_seed1.mp4", "r_seed2.mp4"]

    second = Spy(gen)
    monkeypatch.setattr(gen, "generate", second)
    summary = run_batch(jobs, out, lambda: gen, show_progress=False)
    assert second.seeds == [3, 4, 5]
    assert (summary.skipped, summary.ok) == (2, 3)
    keys = [r["key"] for r in Manifest(out).records()]
    assert keys == [f"r_seed{s}" for s in range(1, 6)], "one line per job across both runs"

    summary = run_batch(jobs, out, must_not_load, show_progress=False)
    assert (summary.skipped, summary.ok) == (5, 0)

    (out / "r_seed4.mp4").unlink()  # recorded done but the video is gone: made again
    third = Spy(gen)
    monkeypatch.setattr(gen, "generate", third)
    run_batch(jobs, out, lambda: gen, show_progress=False)
    assert third.seeds == [4]


def test_a_broken_image_is_recorded_as_failed_and_the_batch_goes_on(gen, tmp_path, monkeypatch):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    path = write_batch(tmp_path, [
        {"id": "bad", "image": "broken.png", "seed": 9, **SMALL},
        {"id": "good", "image": "in.png", "seed": 9, **SMALL},
    ])
    out = tmp_path / "out"
    summary = run_batch(jobs_of(path), out, lambda: gen, show_progress=False)
    assert (summary.ok, summary.failed) == (1, 1)
    bad, good = Manifest(out).records()
    assert bad["key"] == "bad" and bad["status"] == "failed" and "[image]" in bad["error"]
    assert bad["output"] is None and not (out / "bad.mp4").exists() and not (out / "bad.jpg").exists()
    assert bad["parameters"]["seed"] == 9
    assert good["status"] == "ok" and (out / "good.mp4").exists()

    spy = Spy(gen)
    monkeypatch.setattr(gen, "generate", spy)
    summary = run_batch(jobs_of(path), out, lambda: gen, show_progress=False)
    assert (summary.skipped, summary.failed, spy.seeds) == (1, 1, []), "a failed job is retried, a done one not"
    with open(out / "manifest.csv", newline="") as handle:
        assert [(r["key"], r["status"]) for r in csv.DictReader(handle)] == [("bad", "failed"), ("good", "ok")]


def test_a_torn_manifest_line_is_ignored_and_the_next_record_starts_clean(tmp_path):
    manifest = Manifest(tmp_path)
    manifest.append({"key": "a", "status": "ok"})
    with open(manifest.jsonl, "a") as handle:
        handle.write('{"key": "b", "sta')  # a crash in the middle of a write
    manifest.append({"key": "c", "status": "failed"})
    assert [r["key"] for r in manifest.records()] == ["a", "c"]


def test_cli_batch_runs_with_flags_as_row_defaults(tmp_path, monkeypatch, capsys):
    from particalize.cli import main

    monkeypatch.setenv("PARTICALIZE_WEIGHTS_DIR", str(tmp_path / "weights"))
    path = write_batch(tmp_path, [{"image": "in.png", "seed": [1, 2]}, {"image": "in.png", "steps": 2}])
    out = tmp_path / "out"
    args = ["batch", str(path), "--out", str(out), "--model", "tiny", "--steps", "1", "--num-frames", "5",
            "--width", "32", "--height", "32"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["jobs"], summary["ok"], summary["failed"]) == (3, 3, 0)
    steps = {r["key"]: r["parameters"]["steps"] for r in Manifest(out).records()}
    assert steps == {"line1_seed1": 1, "line1_seed2": 1, "line2": 2}
    assert main(args) == 0 and json.loads(capsys.readouterr().out)["skipped"] == 3
