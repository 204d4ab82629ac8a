"""Caller-chosen ids, and the ones the service makes itself."""

from __future__ import annotations

import re
import secrets
import time


def id_pattern(max_length: int = 128) -> str:
    """An id as a regular expression: 1 to `max_length` visible ASCII characters (0x21-0x7E)."""
    return f"^[\\x21-\\x7e]{{1,{max_length}}}$"


_ID = re.compile(id_pattern(), re.ASCII)


def is_valid_id(value: str) -> bool:
    # fullmatch: `$` alone would also accept a trailing newline.
    return _ID.fullmatch(value) is not None


def new_id() -> str:
    """`<epoch milliseconds>x<18 digits>`, the shape of the platform's own ids."""
    return f"{time.time_ns() // 1_000_000}x{secrets.randbelow(10**18):018d}"
