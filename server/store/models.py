"""The tables: tasks and their events, outputs, uploaded inputs, used nonces, workers.

Times are unix seconds as floats (0 = not reached). Task ids are integers (answered as strings).
The claim columns (worker_id, lease_expires_at, attempts) let a task be owned by one worker at a time
and be taken back when that worker dies.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Wiro's lifecycle, in order; `task_cancel` ends a cancelled or killed task.
QUEUED = "task_queue"
ACCEPT = "task_accept"
PREPROCESS_START = "task_preprocess_start"
PREPROCESS_END = "task_preprocess_end"
ASSIGN = "task_assign"
START = "task_start"
OUTPUT = "task_output"
OUTPUT_FULL = "task_output_full"
END = "task_end"
POSTPROCESS_START = "task_postprocess_start"
POSTPROCESS_END = "task_postprocess_end"
CANCEL = "task_cancel"

LIFECYCLE = (
    QUEUED, ACCEPT, PREPROCESS_START, PREPROCESS_END, ASSIGN, START, OUTPUT, OUTPUT_FULL, END,
    POSTPROCESS_START, POSTPROCESS_END,
)
RUNNING = LIFECYCLE[1:-1]
"""Owned by a worker: from accept up to (not including) the end of post-processing."""
TERMINAL = (POSTPROCESS_END, CANCEL)
FINISHING = (OUTPUT_FULL, END, POSTPROCESS_START)
"""The video is made (denoising is over): it is stored and recorded, never made again by this worker's choice."""
ACTIVE = (QUEUED, *RUNNING)
"""Between task_queue and a terminal status: what PARTICALIZE_MAX_ACTIVE_TASKS_PER_KEY counts."""

STAMPS = {
    ACCEPT: "accepttime",
    PREPROCESS_START: "preprocessstarttime",
    PREPROCESS_END: "preprocessendtime",
    ASSIGN: "assigntime",
    START: "starttime",
    END: "endtime",
    POSTPROCESS_START: "postprocessstarttime",
    POSTPROCESS_END: "postprocessendtime",
    CANCEL: "canceltime",
}
"""The time field each status stamps. createtime is set once, when the task is made (a requeued task
keeps it); task_output and task_output_full stamp none."""


class Base(DeclarativeBase):
    pass


def _time() -> Mapped[float]:
    return mapped_column(Float, nullable=False, default=0.0)


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (
        Index("ix_tasks_status_id", "status", "id"),
        Index("ix_tasks_owner_id", "owner", "id"),
        Index("ix_tasks_owner_status", "owner", "status"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    uuid: Mapped[str] = mapped_column(String(36), unique=True, nullable=False)
    socketaccesstoken: Mapped[str] = mapped_column(String(30), unique=True, nullable=False)
    owner: Mapped[str | None] = mapped_column(String(200))
    """The API key that created the task (None when the server runs without keys): the record's `owner`, copied
    here once when the task is made (`lifecycle.create`) so that List and the per-key limit seek it by index."""
    status: Mapped[str] = mapped_column(String(32), nullable=False, default=QUEUED)
    request: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    """The typed record Run validated (server.task_record.TaskRecord as JSON): the parameters, the image, the
    callback URL and the owner, read only through `server.task_record.record_of`. Every row has one (migration 0005
    made those of tasks stored before 0004); nullable only because SQLite cannot tighten a column in place."""
    resolved: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    """The GenerationParams the worker ran with (seed, size and mode resolved), once it has read the image."""
    debugoutput: Mapped[str] = mapped_column(Text, nullable=False, default="")
    debugerror: Mapped[str] = mapped_column(Text, nullable=False, default="")
    pexit: Mapped[str] = mapped_column(String(16), nullable=False, default="0")
    totalcost: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)
    kill_requested: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    progress_step: Mapped[int | None] = mapped_column(Integer)
    """The last denoising step recorded, while it is the latest news (any other debugoutput clears it)."""
    progress_total: Mapped[int | None] = mapped_column(Integer)
    progress_elapsed: Mapped[float | None] = mapped_column(Float)
    """Seconds of denoising up to `progress_step`, as the worker measured them."""

    createtime: Mapped[float] = _time()
    accepttime: Mapped[float] = _time()
    preprocessstarttime: Mapped[float] = _time()
    preprocessendtime: Mapped[float] = _time()
    assigntime: Mapped[float] = _time()
    starttime: Mapped[float] = _time()
    endtime: Mapped[float] = _time()
    postprocessstarttime: Mapped[float] = _time()
    postprocessendtime: Mapped[float] = _time()
    canceltime: Mapped[float] = _time()

    worker_id: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[float | None] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)

    callback_state: Mapped[str] = mapped_column(String(16), nullable=False, default="")
    """'' (no callbackUrl or not terminal yet), pending, delivered, failed."""
    callback_attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    callback_next_at: Mapped[float | None] = mapped_column(Float)


class TaskEvent(Base):
    """Every status a task went through, with its time: the lifecycle as it happened."""

    __tablename__ = "task_events"
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True, nullable=False)
    status: Mapped[str] = mapped_column(String(32), nullable=False)
    at: Mapped[float] = mapped_column(Float, nullable=False)
    message: Mapped[str] = mapped_column(Text, nullable=False, default="")
    step: Mapped[int | None] = mapped_column(Integer)
    """A task_output event's denoising step (and `total`), as numbers; None on other events."""
    total: Mapped[int | None] = mapped_column(Integer)


class Output(Base):
    __tablename__ = "outputs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True, nullable=False)
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    contenttype: Mapped[str] = mapped_column(String(100), nullable=False)
    parentid: Mapped[str] = mapped_column(String(32), nullable=False)
    size: Mapped[int] = mapped_column(BigInteger, nullable=False)
    addedtime: Mapped[float] = mapped_column(Float, nullable=False)
    modifiedtime: Mapped[float] = mapped_column(Float, nullable=False)
    accesskey: Mapped[str] = mapped_column(String(30), nullable=False)
    path: Mapped[str] = mapped_column(Text, nullable=False)
    """Relative to the outputs directory: '<task uuid>/0.mp4'."""


class Upload(Base):
    """An input file sent to File/Upload or as a multipart `inputImage`; kept in the database so that
    a worker on another machine reads it through the only channel it shares with the API."""

    __tablename__ = "uploads"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    contenttype: Mapped[str] = mapped_column(String(100), nullable=False)
    size: Mapped[int] = mapped_column(BigInteger, nullable=False)
    data: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    addedtime: Mapped[float] = mapped_column(Float, nullable=False)
    accesskey: Mapped[str] = mapped_column(String(30), nullable=False)
    owner: Mapped[str | None] = mapped_column(String(200))
    task_id: Mapped[int | None] = mapped_column(ForeignKey("tasks.id", ondelete="SET NULL"), index=True)
    """Set when the file came with a Run request: it is then that task's input (InputOutputDelete removes it)."""


class Nonce(Base):
    """Nonces accepted per key; the primary key makes a second use fail across API replicas."""

    __tablename__ = "nonces"

    api_key: Mapped[str] = mapped_column(String(200), primary_key=True)
    nonce: Mapped[str] = mapped_column(String(40), primary_key=True)
    seen_at: Mapped[float] = mapped_column(Float, nullable=False, index=True)


class Worker(Base):
    """One row per worker (one per GPU): what it runs and when it was last seen."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    """loading, ready, busy, stopping (claims nothing more; may finish its task), stopped, failed."""
    pid: Mapped[int] = mapped_column(Integer, nullable=False)
    model: Mapped[str] = mapped_column(String(200), nullable=False, default="")
    device: Mapped[str] = mapped_column(String(100), nullable=False, default="")
    detail: Mapped[str] = mapped_column(Text, nullable=False, default="")
    started_at: Mapped[float] = mapped_column(Float, nullable=False)
    heartbeat_at: Mapped[float] = mapped_column(Float, nullable=False)
    task_id: Mapped[int | None] = mapped_column(Integer)
    version: Mapped[str] = mapped_column(String(64), nullable=False, default="", server_default="")
    """The particalize version the worker runs (a rolling upgrade shows both)."""
    random_weights: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False, server_default=false())
    """It serves a model built with random values (--random-weights): every video it makes is noise."""
