"""tasks (owner, status) index: Run counts a key's active tasks (PARTICALIZE_MAX_ACTIVE_TASKS_PER_KEY) by seeking
its non-terminal statuses, not by scanning its whole history.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_tasks_owner_status", "tasks", ["owner", "status"])


def downgrade() -> None:
    op.drop_index("ix_tasks_owner_status", table_name="tasks")
