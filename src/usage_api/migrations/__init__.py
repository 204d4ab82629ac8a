"""The schema's history (Alembic revisions in `versions/`), found from the package so that an
installed `usage-api` needs no `alembic.ini` and no particular working directory.

Only `serve`, `migrate` and `demo` change the schema; the other commands check that it is
current and refuse with `SchemaNotCurrent` otherwise.
"""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = [
    "SCRIPT_LOCATION",
    "SchemaNotCurrent",
    "alembic_config",
    "check_current",
    "migrate_to_head",
]

SCRIPT_LOCATION = "usage_api:migrations"


class SchemaNotCurrent(Exception):
    """The database's schema is not the one this code was written for."""


def alembic_config(url: str | None = None) -> Config:
    """Alembic's configuration, without an ini file; `url` is the database to work on."""
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    if url is not None:
        config.attributes["database_url"] = url
    return config


def migrate_to_head(url: str) -> None:
    """Apply every pending migration (several processes may do it at once: see env.py)."""
    command.upgrade(alembic_config(url), "head")


async def check_current(conn: AsyncConnection) -> None:
    """Raise SchemaNotCurrent unless the database is at the head revision."""
    if await conn.scalar(text("SELECT to_regclass('alembic_version')")) is None:
        raise SchemaNotCurrent("the database has no schema yet: run `usage-api migrate` first")
    applied = set((await conn.scalars(text("SELECT version_num FROM alembic_version"))).all())
    script = ScriptDirectory.from_config(alembic_config())
    heads = set(script.get_heads())
    if applied == heads:
        return
    known = {revision.revision for revision in script.walk_revisions()}
    if applied - known:
        raise SchemaNotCurrent(
            f"the database is at revision {', '.join(sorted(applied))}, which this version of"
            " usage-api does not know (it was migrated by a newer one): upgrade usage-api"
        )
    raise SchemaNotCurrent(
        f"the database schema is behind this version of usage-api (at {', '.join(sorted(applied))},"
        f" code at {', '.join(sorted(heads))}): run `usage-api migrate` first"
    )
