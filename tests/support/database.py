"""The Alembic configuration the fixtures migrate a test database with."""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config

ROOT = Path(__file__).resolve().parents[2]


def alembic_config(url: str) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["database_url"] = url
    return config
