"""usage events without foreign keys

Revision ID: 2bfb3ac26c0a
Revises: 885bcd848de6
Create Date: 2026-11-27 14:54:52.279496
"""

from collections.abc import Sequence

from alembic import op

revision: str = "2bfb3ac26c0a"
down_revision: str | None = "885bcd848de6"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_constraint(
        op.f("fk_usage_events_organization_id_organizations"), "usage_events", type_="foreignkey"
    )
    op.drop_constraint(op.f("fk_usage_events_user_users"), "usage_events", type_="foreignkey")


def downgrade() -> None:
    op.create_foreign_key(
        op.f("fk_usage_events_user_users"),
        "usage_events",
        "users",
        ["organization_id", "user_id"],
        ["organization_id", "id"],
    )
    op.create_foreign_key(
        op.f("fk_usage_events_organization_id_organizations"),
        "usage_events",
        "organizations",
        ["organization_id"],
        ["id"],
    )
