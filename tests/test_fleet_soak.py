"""The fleet soak, short (benchmarks/fleet_soak.py: 2,000 tasks and 16 workers there): tasks queued all along through
simulated workers on the real worker code and a private PostgreSQL, one worker SIGKILLed while it holds a task (and
restarted under its id) and PostgreSQL restarted once: every task ends, done, once, its statuses only forward."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.fleet_soak import backwards, soak
from tests.private_postgres import unavailable_reason


def test_the_soak_checker_refuses_a_status_going_back_and_anything_after_the_end():
    assert backwards(["task_queue", "task_accept", "task_start", "task_queue", "task_accept",
                      "task_postprocess_end"]) is None, "a requeue starts an attempt over"
    assert backwards(["task_queue", "task_accept", "task_start", "task_accept"]) == \
        "task_start -> task_accept (event 4)"
    assert backwards(["task_queue", "task_cancel", "task_accept"]) == \
        "task_accept after the terminal task_cancel (event 3)"


@pytest.mark.slow
def test_a_short_soak_loses_nothing_makes_nothing_twice_and_only_goes_forward(tmp_path: Path):
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"no private PostgreSQL cluster: {reason}")
    result = soak(tasks=120, workers=4, kills=1, restart_database=True, data=tmp_path, timeout=300)
    assert [c["what"] for c in result["chaos"]] in (["PostgreSQL restarted", "SIGKILL"],
                                                    ["SIGKILL", "PostgreSQL restarted"]), result["chaos"]
    assert (result["queued"], result["in_store"], result["done"]) == (120, 120, 120), result["lost_examples"]
    assert result["lost"] == 0 and result["not_terminal"] == 0, result["lost_examples"]
    assert result["made_twice"] == 0 and result["made_again_without_a_kill"] == []
    assert result["not_forward"] == 0, result["not_forward_examples"]
    killed = next(c for c in result["chaos"] if c["what"] == "SIGKILL")
    assert result["requeued_tasks"] >= len(killed["holding"]), "the killed worker's task was requeued, not lost"
    assert result["passed"]
