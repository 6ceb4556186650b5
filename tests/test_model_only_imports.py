"""A GPU box that runs only the model (`particalize generate`, `batch`, benchmarks) needs the model's dependencies,
not the API's: building the settings and the generator's options must not import the task store, the web framework
or the rate limiter (seen on an H200 where those packages were absent)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

API_ONLY = ("fastapi", "starlette", "uvicorn", "sqlalchemy", "alembic", "psycopg", "limits", "redis",
            "prometheus_client", "multipart", "python_multipart")

PROGRAM = f"""
import sys
for name in {API_ONLY!r}:
    sys.modules[name] = None  # importing one now raises ImportError
from particalize.settings import Settings
from particalize import compose
settings = Settings(model="tiny", rate_limit_storage="redis://127.0.0.1:6379/0")
options = compose.generator_options(settings)
print(options.preset.name)
"""


def test_settings_and_generator_options_need_none_of_the_api_packages(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", PROGRAM], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("tiny")


def test_a_bad_rate_limit_storage_is_still_refused_without_the_limiter() -> None:
    program = PROGRAM.replace("redis://127.0.0.1:6379/0", "mysql://x")
    done = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert done.returncode != 0
    assert "PARTICALIZE_RATE_LIMIT_STORAGE: the rate limit storage must be memory:// or a Redis URL" in done.stderr
