"""PostgreSQL: every task event is announced with NOTIFY, so workers and API replicas are woken by the database
instead of polling it (server/store/notify.py). An AFTER INSERT trigger on task_events, so every writer of an
event (the lifecycle, a worker's sweep, any replica) announces it in the same transaction, delivered at commit:

- `<schema>.particalize_events`, payload the task id: a new status (API replicas push it to their live followers).
  Not a denoising step's progress (task_output): PostgreSQL signals every listening connection of the database for
  every notification, whatever its channel, so one a step from every busy worker would wake every other worker's
  listener as often (a 256-GPU fleet at one step a second: 65,000 wake-ups a second on the database's host);
  followers of a task that is generating read its progress at their own pace instead (server/live_feed.py);
- `<schema>.particalize_queue`, payload the task id: a task was queued or requeued (idle workers claim);
- `<schema>.particalize_cancel`, payload the task id: a task was cancelled or killed (its worker stops it).

The schema in the channel name keeps two deployments sharing one database (each in its own schema) apart. SQLite
has no NOTIFY: nothing to do there.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

FUNCTION = """
CREATE OR REPLACE FUNCTION particalize_notify_task_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status <> 'task_output' THEN
        PERFORM pg_notify(TG_TABLE_SCHEMA || '.particalize_events', NEW.task_id::text);
    END IF;
    IF NEW.status = 'task_queue' THEN
        PERFORM pg_notify(TG_TABLE_SCHEMA || '.particalize_queue', NEW.task_id::text);
    ELSIF NEW.status = 'task_cancel' THEN
        PERFORM pg_notify(TG_TABLE_SCHEMA || '.particalize_cancel', NEW.task_id::text);
    END IF;
    RETURN NULL;
END
$$
"""
TRIGGER = """
CREATE TRIGGER task_events_notify AFTER INSERT ON task_events
FOR EACH ROW EXECUTE FUNCTION particalize_notify_task_event()
"""


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(FUNCTION)
    op.execute(TRIGGER)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER IF EXISTS task_events_notify ON task_events")
    op.execute("DROP FUNCTION IF EXISTS particalize_notify_task_event()")
