"""initial schema

Revision ID: 885bcd848de6
Revises:
Create Date: 2026-11-27 13:54:33.291307
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "885bcd848de6"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "partners",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_partners")),
    )
    op.create_table(
        "usage_counters",
        sa.Column("organization_id", sa.String(length=128), nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column("sms_outbound", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("sms_inbound", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("mms_outbound", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("mms_inbound", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("voice_seconds", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("voice_kb_seconds", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.PrimaryKeyConstraint("organization_id", "user_id", name=op.f("pk_usage_counters")),
    )
    op.create_table(
        "usage_daily",
        sa.Column("organization_id", sa.String(length=128), nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("sms_outbound", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("sms_inbound", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("mms_outbound", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("mms_inbound", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("voice_seconds", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("voice_kb_seconds", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.PrimaryKeyConstraint("organization_id", "user_id", "day", name=op.f("pk_usage_daily")),
    )
    op.create_table(
        "usage_deltas",
        sa.Column("organization_id", sa.String(length=128), nullable=False),
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column("hour_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sms_outbound", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("sms_inbound", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("mms_outbound", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("mms_inbound", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("voice_seconds", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("voice_kb_seconds", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.PrimaryKeyConstraint("organization_id", "id", name=op.f("pk_usage_deltas")),
    )
    op.create_index(
        op.f("ix_usage_deltas_organization_id_user_id_hour_at"),
        "usage_deltas",
        ["organization_id", "user_id", "hour_at"],
        unique=False,
    )
    op.create_table(
        "usage_hourly",
        sa.Column("organization_id", sa.String(length=128), nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column("hour_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sms_outbound", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("sms_inbound", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("mms_outbound", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("mms_inbound", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("voice_seconds", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("voice_kb_seconds", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.PrimaryKeyConstraint(
            "organization_id", "user_id", "hour_at", name=op.f("pk_usage_hourly")
        ),
    )
    op.create_table(
        "organizations",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("partner_id", sa.String(length=128), nullable=True),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["partner_id"], ["partners.id"], name=op.f("fk_organizations_partner_id_partners")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_organizations")),
    )
    op.create_index(
        op.f("ix_organizations_partner_id"), "organizations", ["partner_id"], unique=False
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("key_hash", sa.LargeBinary(), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=True),
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("partner_id", sa.String(length=128), nullable=True),
        sa.Column("organization_id", sa.String(length=128), nullable=True),
        sa.Column("can_write", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "(scope = 'admin' AND partner_id IS NULL AND organization_id IS NULL) OR (scope = 'partner' AND partner_id IS NOT NULL AND organization_id IS NULL) OR (scope = 'organization' AND organization_id IS NOT NULL AND partner_id IS NULL)",
            name=op.f("ck_api_keys_scope_target"),
        ),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_api_keys_organization_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["partner_id"],
            ["partners.id"],
            name=op.f("fk_api_keys_partner_id_partners"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
    )
    op.create_table(
        "users",
        sa.Column("organization_id", sa.String(length=128), nullable=False),
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_users_organization_id_organizations"),
        ),
        sa.PrimaryKeyConstraint("organization_id", "id", name=op.f("pk_users")),
    )
    op.create_index(op.f("ix_users_id"), "users", ["id"], unique=True)
    op.create_table(
        "usage_events",
        sa.Column("organization_id", sa.String(length=128), nullable=False),
        sa.Column("id", sa.String(length=255), nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=True),
        sa.Column("type", sa.String(length=8), nullable=False),
        sa.Column("direction", sa.String(length=8), nullable=False),
        sa.Column("segments", sa.Integer(), nullable=True),
        sa.Column("seconds", sa.Integer(), nullable=True),
        sa.Column("knowledge_base", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "recorded_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "(type = 'voice' AND seconds IS NOT NULL AND segments IS NULL) OR (type <> 'voice' AND segments IS NOT NULL AND seconds IS NULL AND NOT knowledge_base)",
            name=op.f("ck_usage_events_quantity"),
        ),
        sa.CheckConstraint(
            "direction IN ('outbound', 'inbound')", name=op.f("ck_usage_events_direction")
        ),
        sa.CheckConstraint("type IN ('sms', 'mms', 'voice')", name=op.f("ck_usage_events_type")),
        sa.ForeignKeyConstraint(
            ["organization_id", "user_id"],
            ["users.organization_id", "users.id"],
            name="fk_usage_events_user_users",
        ),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_usage_events_organization_id_organizations"),
        ),
        sa.PrimaryKeyConstraint("organization_id", "id", name=op.f("pk_usage_events")),
    )
    op.create_index(
        "ix_usage_events_org_occurred",
        "usage_events",
        ["organization_id", "occurred_at"],
        unique=False,
        postgresql_include=["type", "direction", "segments", "seconds", "knowledge_base"],
    )
    op.create_index(
        "ix_usage_events_org_user_occurred",
        "usage_events",
        ["organization_id", "user_id", "occurred_at"],
        unique=False,
        postgresql_include=["type", "direction", "segments", "seconds", "knowledge_base"],
        postgresql_where=sa.text("user_id IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index(
        "ix_usage_events_org_user_occurred",
        table_name="usage_events",
        postgresql_include=["type", "direction", "segments", "seconds", "knowledge_base"],
        postgresql_where=sa.text("user_id IS NOT NULL"),
    )
    op.drop_index(
        "ix_usage_events_org_occurred",
        table_name="usage_events",
        postgresql_include=["type", "direction", "segments", "seconds", "knowledge_base"],
    )
    op.drop_table("usage_events")
    op.drop_index(op.f("ix_users_id"), table_name="users")
    op.drop_table("users")
    op.drop_table("api_keys")
    op.drop_index(op.f("ix_organizations_partner_id"), table_name="organizations")
    op.drop_table("organizations")
    op.drop_table("usage_hourly")
    op.drop_index(
        op.f("ix_usage_deltas_organization_id_user_id_hour_at"), table_name="usage_deltas"
    )
    op.drop_table("usage_deltas")
    op.drop_table("usage_daily")
    op.drop_table("usage_counters")
    op.drop_table("partners")
