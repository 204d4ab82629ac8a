"""partner and monthly roll-ups

Revision ID: 5b1e7c3d9a20
Revises: d4a5b0c7e912
Create Date: 2026-12-01 12:00:00.000000

`partner_hourly` and `partner_daily` hold each partner's usage summed over its
organizations of now. The fold adds to them; an organization that changes partner takes
its folded history from the old partner's rows to the new one's, in the transaction of the
change and under the fold's advisory lock (so no fold runs between reading the
organization's roll-ups and moving them). A trigger does it, so every writer of
`organizations` (the API, imports, a hand-run UPDATE) keeps the partner rows exact.

`organization_monthly` holds each organization's own usage per UTC month (the sum of its
`user_id = ''` daily rows), for breakdowns of a partner over long ranges.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "5b1e7c3d9a20"
down_revision: str | None = "d4a5b0c7e912"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

METRICS = (
    "sms_outbound",
    "sms_inbound",
    "mms_outbound",
    "mms_inbound",
    "voice_seconds",
    "voice_kb_seconds",
)
# rollup._FOLD_LOCK, "usage" in hex.
FOLD_LOCK = 0x7573616765


def _metric_columns() -> list[sa.Column[int]]:
    return [
        sa.Column(m, sa.BigInteger(), server_default=sa.text("0"), nullable=False) for m in METRICS
    ]


def _move(table: str, source: str, unit: str, partner: str, sign: str) -> str:
    """Add (sign '') or take away (sign '-') the organization's rows of `source`."""
    columns = ", ".join(METRICS)
    signed = ", ".join(f"{sign}{m}" for m in METRICS)
    added = ", ".join(f"{m} = p.{m} + excluded.{m}" for m in METRICS)
    return f"""
        INSERT INTO {table} AS p (partner_id, {unit}, {columns})
        SELECT {partner}, {unit}, {signed} FROM {source}
        WHERE organization_id = NEW.id AND user_id = ''
        ORDER BY {unit}
        ON CONFLICT (partner_id, {unit}) DO UPDATE SET {added};"""


def upgrade() -> None:
    # No fold between the partner rows' first sums and the trigger that keeps them.
    op.execute(f"SELECT pg_advisory_xact_lock({FOLD_LOCK})")
    for table, unit, kind in (
        ("partner_hourly", "hour_at", sa.DateTime(timezone=True)),
        ("partner_daily", "day", sa.Date()),
    ):
        op.create_table(
            table,
            sa.Column("partner_id", sa.String(length=128), nullable=False),
            sa.Column(unit, kind, nullable=False),
            *_metric_columns(),
            sa.PrimaryKeyConstraint("partner_id", unit, name=op.f(f"pk_{table}")),
        )
    op.create_table(
        "organization_monthly",
        sa.Column("organization_id", sa.String(length=128), nullable=False),
        sa.Column("month", sa.Date(), nullable=False),
        *_metric_columns(),
        sa.PrimaryKeyConstraint("organization_id", "month", name=op.f("pk_organization_monthly")),
    )
    moves = "".join(
        f"""
    IF OLD.partner_id IS NOT NULL THEN{_move(table, source, unit, "OLD.partner_id", "-")}
    END IF;
    IF NEW.partner_id IS NOT NULL THEN{_move(table, source, unit, "NEW.partner_id", "")}
    END IF;"""
        for table, source, unit in (
            ("partner_hourly", "usage_hourly", "hour_at"),
            ("partner_daily", "usage_daily", "day"),
        )
    )
    op.execute(f"""
CREATE FUNCTION move_partner_history() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Under REPEATABLE READ the snapshot would predate a fold this waited for.
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'an organization changes partner only in a READ COMMITTED transaction';
    END IF;
    PERFORM pg_advisory_xact_lock({FOLD_LOCK});{moves}
    RETURN NULL;
END
$$""")
    op.execute("""
CREATE TRIGGER organizations_move_partner_history
AFTER UPDATE OF partner_id ON organizations
FOR EACH ROW WHEN (OLD.partner_id IS DISTINCT FROM NEW.partner_id)
EXECUTE FUNCTION move_partner_history()""")
    # Partners that already have organizations with history start from it.
    columns = ", ".join(METRICS)
    sums = ", ".join(f"sum(r.{m})" for m in METRICS)
    for table, source, unit in (
        ("partner_hourly", "usage_hourly", "hour_at"),
        ("partner_daily", "usage_daily", "day"),
    ):
        op.execute(f"""
INSERT INTO {table} (partner_id, {unit}, {columns})
SELECT o.partner_id, r.{unit}, {sums} FROM {source} r
JOIN organizations o ON o.id = r.organization_id
WHERE r.user_id = '' AND o.partner_id IS NOT NULL
GROUP BY 1, 2""")
    op.execute(f"""
INSERT INTO organization_monthly (organization_id, month, {columns})
SELECT organization_id, date_trunc('month', day::timestamp)::date, {", ".join(f"sum({m})" for m in METRICS)}
FROM usage_daily WHERE user_id = '' GROUP BY 1, 2""")


def downgrade() -> None:
    op.execute("DROP TRIGGER organizations_move_partner_history ON organizations")
    op.execute("DROP FUNCTION move_partner_history()")
    op.drop_table("organization_monthly")
    op.drop_table("partner_daily")
    op.drop_table("partner_hourly")
