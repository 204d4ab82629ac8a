"""usage deltas with one index

Revision ID: 7c1d0e4f9a2b
Revises: 51bd23b3fbf1
Create Date: 2026-11-27 17:55:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "7c1d0e4f9a2b"
down_revision: str | None = "51bd23b3fbf1"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index(op.f("ix_usage_deltas_organization_id_user_id_hour_at"), "usage_deltas")
    op.drop_constraint(op.f("pk_usage_deltas"), "usage_deltas", type_="primary")
    op.create_primary_key(
        op.f("pk_usage_deltas"), "usage_deltas", ["organization_id", "user_id", "hour_at", "id"]
    )


def downgrade() -> None:
    op.drop_constraint(op.f("pk_usage_deltas"), "usage_deltas", type_="primary")
    op.create_primary_key(op.f("pk_usage_deltas"), "usage_deltas", ["organization_id", "id"])
    op.create_index(
        op.f("ix_usage_deltas_organization_id_user_id_hour_at"),
        "usage_deltas",
        ["organization_id", "user_id", "hour_at"],
    )
