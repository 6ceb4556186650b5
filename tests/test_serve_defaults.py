"""What a new user meets first: `serve`'s banner names `particalize keys create` when auth is off; serving the
tiny preset tightens the default limits so that a laptop never queues a multi-hour task; the Python client's
wait() allows a real GPU video's minutes."""

from __future__ import annotations

import inspect
from argparse import Namespace
from pathlib import Path

import uvicorn
from fastapi.testclient import TestClient

from particalize.cli_server import TINY_LIMITS, cmd_serve, tiny_limits
from particalize.client import WiroClient
from particalize.settings import Settings
from server.app import create_app
from tests.conftest import make_settings


def test_serve_names_keys_create_when_auth_is_off_and_the_tiny_limits(tmp_path: Path, monkeypatch, capsys):
    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.append(kwargs))
    settings = make_settings(tmp_path, workers=0)
    assert cmd_serve(Namespace(allow_unauthenticated_public=False, model="tiny"), lambda args: settings) == 0
    out = capsys.readouterr().out
    assert "`particalize keys create`" in out and "PARTICALIZE_API_KEYS=key:secret" in out
    assert f"width x height at most {TINY_LIMITS['max_pixels']} pixels" in out
    assert served and served[0]["host"] == "127.0.0.1"


def test_tiny_limits_replace_only_the_defaults(tmp_path: Path):
    tight, line = tiny_limits(make_settings(tmp_path))
    assert (tight.max_pixels, tight.max_work) == (TINY_LIMITS["max_pixels"], TINY_LIMITS["max_work"])
    assert "PARTICALIZE_MAX_PIXELS" in line
    kept, _ = tiny_limits(make_settings(tmp_path, max_pixels=1280 * 720 - 16))
    assert kept.max_pixels == 1280 * 720 - 16, "a limit the operator set is kept"
    real, line = tiny_limits(make_settings(tmp_path, model="wan2.1-i2v-14b-480p"))
    assert real.max_pixels == 1280 * 720 and line is None


def test_a_limit_set_to_exactly_its_default_still_wins_over_the_tiny_presets(tmp_path: Path, monkeypatch):
    default = Settings.model_fields["max_pixels"].default
    kept, _ = tiny_limits(make_settings(tmp_path, max_pixels=default))
    assert kept.max_pixels == default, "set by the operator (here as a flag would), whatever its value"
    assert kept.max_work == TINY_LIMITS["max_work"], "the one left unset is still tightened"
    monkeypatch.setenv("PARTICALIZE_MAX_PIXELS", str(default))
    from_env, _ = tiny_limits(Settings().with_overrides(model="tiny", data_dir=tmp_path))
    assert from_env.max_pixels == default, "set in the environment"


def test_a_720p_request_to_the_tiny_preset_is_refused_naming_the_limit(tmp_path: Path):
    settings, _ = tiny_limits(make_settings(tmp_path, f"sqlite:///{tmp_path / 'tasks.db'}", allow_private_urls=True))
    with TestClient(create_app(settings)) as client:
        answer = client.post("/v1/Run/codexq/Particalize", json={
            "inputImageUrl": "http://127.0.0.1:9/dog.png", "width": 1280, "height": 720, "numFrames": 81,
            "steps": 50}).json()
    assert answer["errors"] == [{"code": 0, "message": "Request parameter [width] x height must be at most 61440 "
                                                       "pixels, got 1280x720."}]


def test_the_clients_wait_allows_a_real_gpu_video():
    default = inspect.signature(WiroClient.wait).parameters["timeout"].default
    assert default >= 30 * 60, "a 720P video is ~11.5 minutes of GPU time, plus any queue"
