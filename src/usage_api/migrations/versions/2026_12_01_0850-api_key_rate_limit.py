"""api key rate limit

Revision ID: 8c2731505e06
Revises: 7c1d0e4f9a2b
Create Date: 2026-12-01 08:50:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "8c2731505e06"
down_revision: str | None = "7c1d0e4f9a2b"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # NULL: the serving process's USAGE_API_RATE_LIMIT, so existing keys keep the limit
    # they had.
    op.add_column("api_keys", sa.Column("rate_limit", sa.Integer(), nullable=True))
    op.create_check_constraint(op.f("ck_api_keys_rate_limit"), "api_keys", "rate_limit >= 0")


def downgrade() -> None:
    op.drop_constraint(op.f("ck_api_keys_rate_limit"), "api_keys", type_="check")
    op.drop_column("api_keys", "rate_limit")
