"""The schema. Every table of tenant data leads its primary key and indexes with
`organization_id`, so it can be distributed by organization without redesign.

Usage is kept three ways that always agree:

- `usage_events`: the log, one row per accepted event; the source of truth.
- `usage_deltas`: append-only sums of what each ingest transaction inserted, per
  (organization, user, hour). Writers only ever insert here, so no row is hot.
- `usage_counters`, `usage_hourly`, `usage_daily`: roll-ups that `rollup.fold` moves
  deltas into, deleting them in the same statement. Readers add the deltas not yet
  folded, so a read is exact and real time whatever the fold lags.
- `partner_hourly`, `partner_daily`: the same roll-ups summed over each partner's
  organizations of now, so a partner's range reads a row per day, not one per
  organization per day. The fold keeps them; an organization that changes partner takes
  its history along under the fold's lock (a trigger, see `rollup`).
- `organization_monthly`: each organization's own usage per UTC month, so a partner's
  breakdown over a year reads a dozen rows per organization, not one per day.

In roll-ups and deltas `user_id = ''` stands for "no user": the organization's own row
in the roll-ups, an event without a user in the deltas. Real ids are never empty.
"""

from __future__ import annotations

from datetime import date, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    String,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

METRICS = (
    "sms_outbound",
    "sms_inbound",
    "mms_outbound",
    "mms_inbound",
    "voice_seconds",
    "voice_kb_seconds",
)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _created_at() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), server_default=text("now()"))


class Metrics:
    """The six sums every roll-up and delta row carries (see `METRICS`)."""

    sms_outbound: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    sms_inbound: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    mms_outbound: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    mms_inbound: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    voice_seconds: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    voice_kb_seconds: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))


class Partner(Base):
    __tablename__ = "partners"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _created_at()


class Organization(Base):
    __tablename__ = "organizations"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    partner_id: Mapped[str | None] = mapped_column(
        String(128), ForeignKey("partners.id"), index=True
    )
    name: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _created_at()


class User(Base):
    __tablename__ = "users"
    # User ids are global (a user is addressed by id alone), hence the unique index;
    # the primary key still leads with the organization.
    __table_args__ = (Index(None, "id", unique=True),)

    organization_id: Mapped[str] = mapped_column(
        String(128), ForeignKey("organizations.id"), primary_key=True
    )
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    email: Mapped[str] = mapped_column(String(320))
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _created_at()


class ApiKey(Base):
    __tablename__ = "api_keys"
    __table_args__ = (
        CheckConstraint(
            "(scope = 'admin' AND partner_id IS NULL AND organization_id IS NULL)"
            " OR (scope = 'partner' AND partner_id IS NOT NULL AND organization_id IS NULL)"
            " OR (scope = 'organization' AND organization_id IS NOT NULL AND partner_id IS NULL)",
            name="scope_target",
        ),
        CheckConstraint("rate_limit >= 0", name="rate_limit"),
    )

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    key_hash: Mapped[bytes] = mapped_column(unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    name: Mapped[str | None] = mapped_column(String(255))
    scope: Mapped[str] = mapped_column(String(16))
    partner_id: Mapped[str | None] = mapped_column(
        String(128), ForeignKey("partners.id", ondelete="CASCADE")
    )
    organization_id: Mapped[str | None] = mapped_column(
        String(128), ForeignKey("organizations.id", ondelete="CASCADE")
    )
    can_write: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    created_at: Mapped[datetime] = _created_at()
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Written at most once a minute per key (see ratelimit.py), never on every request.
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Requests per rate-limit window; 0: unlimited; NULL: USAGE_API_RATE_LIMIT.
    rate_limit: Mapped[int | None] = mapped_column(Integer)


class ApiKeyWindow(Base):
    """How many requests a key made in its current rate-limit window, summed over every
    worker and replica; each worker adds its own counts a few times a second."""

    __tablename__ = "api_key_windows"

    key_id: Mapped[str] = mapped_column(
        String(128), ForeignKey("api_keys.id", ondelete="CASCADE"), primary_key=True
    )
    window_start: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    requests: Mapped[int] = mapped_column(BigInteger)


class DashboardSession(Base):
    """A signed-in dashboard: the hash of the random token its cookie holds, and the key
    it was opened with. Every page load joins it to that key, so revoking or expiring the
    key ends the session at once; the key itself is never kept."""

    __tablename__ = "dashboard_sessions"

    token_hash: Mapped[bytes] = mapped_column(primary_key=True)
    key_id: Mapped[str] = mapped_column(
        String(128), ForeignKey("api_keys.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime] = _created_at()
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class UsageEvent(Base):
    """One accepted event. Its organization and user are checked by ingest in the same
    transaction, not by foreign keys: a foreign key check takes a KEY SHARE lock on the
    organization's row for every event, so concurrent writers to one organization would
    all meet on that row (and its multixacts). Organizations and users are never deleted."""

    __tablename__ = "usage_events"
    __table_args__ = (
        CheckConstraint("type IN ('sms', 'mms', 'voice')", name="type"),
        CheckConstraint("direction IN ('outbound', 'inbound')", name="direction"),
        CheckConstraint(
            "(type = 'voice' AND seconds IS NOT NULL AND segments IS NULL)"
            " OR (type <> 'voice' AND segments IS NOT NULL AND seconds IS NULL"
            " AND NOT knowledge_base)",
            name="quantity",
        ),
        # Range edges sum raw rows; the INCLUDE columns make that an index-only scan.
        Index(
            "ix_usage_events_org_occurred",
            "organization_id",
            "occurred_at",
            postgresql_include=["type", "direction", "segments", "seconds", "knowledge_base"],
        ),
        Index(
            "ix_usage_events_org_user_occurred",
            "organization_id",
            "user_id",
            "occurred_at",
            postgresql_include=["type", "direction", "segments", "seconds", "knowledge_base"],
            postgresql_where=text("user_id IS NOT NULL"),
        ),
    )

    organization_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    user_id: Mapped[str | None] = mapped_column(String(128))
    type: Mapped[str] = mapped_column(String(8))
    direction: Mapped[str] = mapped_column(String(8))
    segments: Mapped[int | None] = mapped_column(Integer)
    seconds: Mapped[int | None] = mapped_column(Integer)
    knowledge_base: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    recorded_at: Mapped[datetime] = _created_at()


class UsageDelta(Metrics, Base):
    """The primary key leads with what reads look deltas up by; `id` only makes it unique.
    So appending a delta writes one index entry, not two."""

    __tablename__ = "usage_deltas"

    organization_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    hour_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)


class UsageCounter(Metrics, Base):
    __tablename__ = "usage_counters"

    organization_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(128), primary_key=True)


class UsageHourly(Metrics, Base):
    __tablename__ = "usage_hourly"

    organization_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    hour_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)


class UsageDaily(Metrics, Base):
    __tablename__ = "usage_daily"

    organization_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)


class PartnerHourly(Metrics, Base):
    __tablename__ = "partner_hourly"

    partner_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    hour_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)


class PartnerDaily(Metrics, Base):
    __tablename__ = "partner_daily"

    partner_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)


class OrganizationMonthly(Metrics, Base):
    """`month` is the first day of a UTC month."""

    __tablename__ = "organization_monthly"

    organization_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    month: Mapped[date] = mapped_column(Date, primary_key=True)
