"""api key last use and rate-limit windows

Revision ID: 51bd23b3fbf1
Revises: 2bfb3ac26c0a
Create Date: 2026-11-27 16:56:06.490720
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "51bd23b3fbf1"
down_revision: str | None = "2bfb3ac26c0a"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_key_windows",
        sa.Column("key_id", sa.String(length=128), nullable=False),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["key_id"],
            ["api_keys.id"],
            name=op.f("fk_api_key_windows_key_id_api_keys"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("key_id", name=op.f("pk_api_key_windows")),
    )
    op.add_column("api_keys", sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("api_keys", "last_used_at")
    op.drop_table("api_key_windows")
