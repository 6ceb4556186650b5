"""Random identifiers the store hands out: socket access tokens, access keys, upload and output ids."""

from __future__ import annotations

import secrets
import string
import uuid

_TOKEN_ALPHABET = string.ascii_letters + string.digits


def new_token(length: int = 30) -> str:
    """A socket access token: `length` random letters and digits from the OS's cryptographic source."""
    return "".join(secrets.choice(_TOKEN_ALPHABET) for _ in range(length))


def new_id() -> str:
    return uuid.uuid4().hex
