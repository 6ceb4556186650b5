"""Typed task records: the validated request and the parameters used as JSON, progress and random weights as
numbers and a flag instead of text to parse.

Existing rows still read: a task without `request` is rendered from its `parameters` text, and the progress of
recorded task_output events ("step k/N") and the random-weights mark of registered workers are copied into the
new columns here, once.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import re

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_STEP = re.compile(r"step (\d+)/(\d+)")


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("request", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("resolved", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("progress_step", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("progress_total", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("progress_elapsed", sa.Float(), nullable=True))
    with op.batch_alter_table("task_events") as batch:
        batch.add_column(sa.Column("step", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("total", sa.Integer(), nullable=True))
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("random_weights", sa.Boolean(), nullable=False, server_default=sa.false()))

    conn = op.get_bind()
    events = sa.table("task_events", sa.column("id", sa.Integer), sa.column("status", sa.String),
                      sa.column("message", sa.Text), sa.column("step", sa.Integer), sa.column("total", sa.Integer))
    steps = []
    for event_id, message in conn.execute(sa.select(events.c.id, events.c.message)
                                          .where(events.c.status == "task_output")):
        found = _STEP.match(message or "")
        if found is not None and int(found.group(2)) > 0:
            steps.append({"event_id": event_id, "step": int(found.group(1)), "total": int(found.group(2))})
    if steps:
        conn.execute(events.update().where(events.c.id == sa.bindparam("event_id"))
                     .values(step=sa.bindparam("step"), total=sa.bindparam("total")), steps)
    workers = sa.table("workers", sa.column("detail", sa.Text), sa.column("random_weights", sa.Boolean))
    conn.execute(workers.update().where(workers.c.detail.contains("RANDOM WEIGHTS")).values(random_weights=True))


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("random_weights")
    with op.batch_alter_table("task_events") as batch:
        batch.drop_column("total")
        batch.drop_column("step")
    with op.batch_alter_table("tasks") as batch:
        for name in ("progress_elapsed", "progress_total", "progress_step", "resolved", "request"):
            batch.drop_column(name)
