"""The GPU worker: the claiming loop (loop.py), one task's run (task_run.py) and the table of how a run ends
(outcomes.py); `run_worker` (entry.py) is the process entry of `particalize worker` and of the workers
`particalize serve` starts."""

from server.worker.entry import run_worker
from server.worker.loop import Worker
from server.worker.options import FetchOptions, WorkerOptions, worker_id_for
from server.worker.outcomes import Outcome, failure_reason
from server.worker.task_run import Generator

__all__ = ["FetchOptions", "Generator", "Outcome", "Worker", "WorkerOptions", "failure_reason",
           "run_worker", "worker_id_for"]
