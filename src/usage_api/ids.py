"""Caller-chosen ids, and the ones the service makes itself."""

from __future__ import annotations

import re
import secrets
import time

_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+", re.ASCII)


def is_valid_id(value: str, max_length: int = 128) -> bool:
    """1 to `max_length` visible ASCII characters (0x21-0x7E)."""
    return len(value) <= max_length and _VISIBLE_ASCII.fullmatch(value) is not None


def new_id() -> str:
    """`<epoch milliseconds>x<18 digits>`, the shape of the platform's own ids."""
    return f"{time.time_ns() // 1_000_000}x{secrets.randbelow(10**18):018d}"
