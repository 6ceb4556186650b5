"""Initial schema: tasks, task_events, outputs, uploads, nonces, workers.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _time(name: str) -> sa.Column:
    return sa.Column(name, sa.Float(), nullable=False)


def upgrade() -> None:
    op.create_table(
        "tasks",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("uuid", sa.String(36), nullable=False),
        sa.Column("socketaccesstoken", sa.String(30), nullable=False),
        sa.Column("owner", sa.String(200), nullable=True),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("parameters", sa.Text(), nullable=False),
        sa.Column("image_url", sa.Text(), nullable=True),
        sa.Column("upload_id", sa.String(32), nullable=True),
        sa.Column("callbackurl", sa.Text(), nullable=False),
        sa.Column("debugoutput", sa.Text(), nullable=False),
        sa.Column("debugerror", sa.Text(), nullable=False),
        sa.Column("pexit", sa.String(16), nullable=False),
        sa.Column("totalcost", sa.Float(), nullable=False),
        sa.Column("kill_requested", sa.Boolean(), nullable=False),
        *(_time(name) for name in (
            "createtime", "accepttime", "preprocessstarttime", "preprocessendtime", "assigntime", "starttime",
            "endtime", "postprocessstarttime", "postprocessendtime", "canceltime",
        )),
        sa.Column("worker_id", sa.String(200), nullable=True),
        sa.Column("lease_expires_at", sa.Float(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("callback_state", sa.String(16), nullable=False),
        sa.Column("callback_attempts", sa.Integer(), nullable=False),
        sa.Column("callback_next_at", sa.Float(), nullable=True),
        sa.UniqueConstraint("uuid"),
        sa.UniqueConstraint("socketaccesstoken"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_tasks_status_id", "tasks", ["status", "id"])
    op.create_index("ix_tasks_owner_id", "tasks", ["owner", "id"])

    op.create_table(
        "task_events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("task_id", sa.Integer(), sa.ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_task_events_task_id", "task_events", ["task_id"])

    op.create_table(
        "outputs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("task_id", sa.Integer(), sa.ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("contenttype", sa.String(100), nullable=False),
        sa.Column("parentid", sa.String(32), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("addedtime", sa.Float(), nullable=False),
        sa.Column("modifiedtime", sa.Float(), nullable=False),
        sa.Column("accesskey", sa.String(30), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
    )
    op.create_index("ix_outputs_task_id", "outputs", ["task_id"])

    op.create_table(
        "uploads",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("contenttype", sa.String(100), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("addedtime", sa.Float(), nullable=False),
        sa.Column("accesskey", sa.String(30), nullable=False),
        sa.Column("owner", sa.String(200), nullable=True),
        sa.Column("task_id", sa.Integer(), sa.ForeignKey("tasks.id", ondelete="SET NULL"), nullable=True),
    )
    op.create_index("ix_uploads_task_id", "uploads", ["task_id"])

    op.create_table(
        "nonces",
        sa.Column("api_key", sa.String(200), primary_key=True),
        sa.Column("nonce", sa.String(40), primary_key=True),
        sa.Column("seen_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_nonces_seen_at", "nonces", ["seen_at"])

    op.create_table(
        "workers",
        sa.Column("id", sa.String(200), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("device", sa.String(100), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("heartbeat_at", sa.Float(), nullable=False),
        sa.Column("task_id", sa.Integer(), nullable=True),
    )


def downgrade() -> None:
    for table in ("workers", "nonces", "uploads", "outputs", "task_events", "tasks"):
        op.drop_table(table)
