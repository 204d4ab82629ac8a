"""room on the roll-ups' pages for the fold's updates

Revision ID: 8c2f6a1e4b73
Revises: 5b1e7c3d9a20
Create Date: 2026-12-01 13:00:00.000000

The fold adds to roll-up rows in place. A page filled to the brim has no room for the new
version of a row, so every such update goes to another page and writes a new entry in
every index of the table: WAL and work the fold does for each delta. With room left on
each page, PostgreSQL keeps the new version beside the old (a HOT update) and writes no
index entry; the old versions are pruned from the page as it fills.

The rows updated most (counters, an organization's and a partner's rows, a month) get the
most room; the hourly and daily rows are mostly written once and updated while their hour
or day is current, which are the newest pages, so they keep most of each page for reads.

The setting applies to pages written from now on: the existing rows are not rewritten
here (that takes VACUUM FULL, which cannot run in a migration's transaction and locks the
table for its duration). A row updated on a full page moves to a page with room once, and
from then on its updates stay on that page, so the tables settle by themselves.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "8c2f6a1e4b73"
down_revision: str | None = "5b1e7c3d9a20"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FILLFACTOR = {
    "usage_counters": 70,
    "organization_monthly": 70,
    "partner_hourly": 70,
    "partner_daily": 70,
    "usage_daily": 85,
    "usage_hourly": 90,
}


def upgrade() -> None:
    for table, fillfactor in FILLFACTOR.items():
        op.execute(f"ALTER TABLE {table} SET (fillfactor = {fillfactor})")


def downgrade() -> None:
    for table in FILLFACTOR:
        op.execute(f"ALTER TABLE {table} RESET (fillfactor)")
