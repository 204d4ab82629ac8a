"""Settings, read once from the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path


class ConfigError(ValueError):
    """A setting that cannot be used as given; the message says which and why."""


def _int(name: str, default: int, minimum: int = 0) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def _bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if raw == "":
        return default
    return raw in {"1", "true", "yes", "on"}


def _urls(name: str) -> tuple[str, ...]:
    """A comma-separated list of URLs; blanks around and between them are ignored."""
    return tuple(url.strip() for url in os.environ.get(name, "").split(",") if url.strip())


def _data_dir() -> Path:
    """The embedded database's data directory: USAGE_API_DATA_DIR, else a per-user default."""
    if explicit := os.environ.get("USAGE_API_DATA_DIR"):
        return Path(explicit).expanduser()
    if os.geteuid() == 0:
        # Root's server runs as an unprivileged account, which could not enter /root (0700):
        # a system location it can reach, rather than opening up root's home for it.
        return Path("/var/lib/usage-api/postgres")
    # Per the XDG spec an empty XDG_DATA_HOME counts as unset.
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "usage-api" / "postgres"


@dataclass(frozen=True)
class Settings:
    database_url: str | None
    powered_by: str
    pool_size: int
    # How many ingestion statements a process runs at once; batches arriving meanwhile are
    # written together (`ingest.Writer`).
    write_statements: int
    statement_timeout_ms: int
    max_body_bytes: int
    rollup_interval_ms: int
    rate_limit: int
    rate_limit_window_s: int
    rate_limit_sync_ms: int
    docs_enabled: bool
    metrics_enabled: bool
    log_level: str
    # Where worker processes share their metrics (`serve --workers N` sets it).
    metrics_dir: str | None
    # The embedded database (used without DATABASE_URL): where, and whether it may run at all
    # (the container image turns it off: there, a missing DATABASE_URL is a mistake).
    data_dir: Path
    embedded_database: bool
    max_head_bytes: int
    max_header_fields: int
    head_timeout_s: int
    body_timeout_s: int
    keep_alive_timeout_s: int
    max_connections: int
    # Streaming replicas of database_url that serve reads (docs/scaling.md), and how long
    # a read waits for one to catch up before the primary answers it.
    database_read_urls: tuple[str, ...]
    replica_wait_ms: int

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            database_url=os.environ.get("DATABASE_URL") or None,
            powered_by=os.environ.get("USAGE_API_POWERED_BY", "Teli"),
            pool_size=_int("USAGE_API_POOL_SIZE", 10),
            write_statements=_int("USAGE_API_WRITE_STATEMENTS", 2, minimum=1),
            statement_timeout_ms=_int("USAGE_API_STATEMENT_TIMEOUT_MS", 5000),
            max_body_bytes=_int("USAGE_API_MAX_BODY_BYTES", 1024 * 1024),
            rollup_interval_ms=_int("USAGE_API_ROLLUP_INTERVAL_MS", 500),
            rate_limit=_int("USAGE_API_RATE_LIMIT", 6000),
            rate_limit_window_s=_int("USAGE_API_RATE_LIMIT_WINDOW_S", 60, minimum=1),
            rate_limit_sync_ms=_int("USAGE_API_RATE_LIMIT_SYNC_MS", 100, minimum=1),
            docs_enabled=_bool("USAGE_API_DOCS", True),
            metrics_enabled=_bool("USAGE_API_METRICS", True),
            log_level=os.environ.get("USAGE_API_LOG_LEVEL", "info"),
            metrics_dir=os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None,
            data_dir=_data_dir(),
            embedded_database=_bool("USAGE_API_EMBEDDED_DATABASE", True),
            max_head_bytes=_int("USAGE_API_MAX_HEAD_BYTES", 16 * 1024, minimum=1024),
            max_header_fields=_int("USAGE_API_MAX_HEADER_FIELDS", 100, minimum=1),
            head_timeout_s=_int("USAGE_API_HEAD_TIMEOUT_S", 10, minimum=1),
            body_timeout_s=_int("USAGE_API_BODY_TIMEOUT_S", 30, minimum=1),
            keep_alive_timeout_s=_int("USAGE_API_KEEP_ALIVE_TIMEOUT_S", 5, minimum=1),
            max_connections=_int("USAGE_API_MAX_CONNECTIONS", 1000, minimum=1),
            database_read_urls=_urls("DATABASE_READ_URLS"),
            replica_wait_ms=_int("USAGE_API_REPLICA_WAIT_MS", 10),
        )


@lru_cache
def get_settings() -> Settings:
    return Settings.from_env()
