"""hourly roll-ups for organizations only

Revision ID: 55c8c1ada99d
Revises: 51bd23b3fbf1
Create Date: 2026-11-27 17:08:00.000000

A user's range now reads its whole days from `usage_daily` and its partial days from the
log, so the folder no longer keeps hourly rows for users; the ones already there go.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "55c8c1ada99d"
down_revision: str | None = "51bd23b3fbf1"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_METRICS = (
    "sms_outbound",
    "sms_inbound",
    "mms_outbound",
    "mms_inbound",
    "voice_seconds",
    "voice_kb_seconds",
)


def upgrade() -> None:
    op.execute("DELETE FROM usage_hourly WHERE user_id <> ''")


def downgrade() -> None:
    # What the folder would have written: the log's events of each user and hour, less
    # those still waiting in `usage_deltas` (the folder adds them when it folds them).
    columns = ", ".join(_METRICS)
    sums = ", ".join(f"sum({m})" for m in _METRICS)
    op.execute(f"""
        INSERT INTO usage_hourly (organization_id, user_id, hour_at, {columns})
        SELECT organization_id, user_id, hour_at, {sums} FROM (
            SELECT organization_id, user_id, date_trunc('hour', occurred_at, 'UTC') AS hour_at,
                CASE WHEN type = 'sms' AND direction = 'outbound' THEN segments ELSE 0 END,
                CASE WHEN type = 'sms' AND direction = 'inbound' THEN segments ELSE 0 END,
                CASE WHEN type = 'mms' AND direction = 'outbound' THEN segments ELSE 0 END,
                CASE WHEN type = 'mms' AND direction = 'inbound' THEN segments ELSE 0 END,
                CASE WHEN type = 'voice' AND NOT knowledge_base THEN seconds ELSE 0 END,
                CASE WHEN type = 'voice' AND knowledge_base THEN seconds ELSE 0 END
            FROM usage_events WHERE user_id IS NOT NULL
            UNION ALL
            SELECT organization_id, user_id, hour_at, {", ".join(f"-{m}" for m in _METRICS)}
            FROM usage_deltas WHERE user_id <> ''
        ) AS signed ({"organization_id, user_id, hour_at, " + columns})
        GROUP BY organization_id, user_id, hour_at
    """)
