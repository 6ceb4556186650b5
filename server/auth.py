"""Wiro's request authentication: `x-api-key`, plus `x-nonce`/`x-signature` HMAC for signed keys.

x-signature = hex(HMAC-SHA256(key=API_KEY, msg=API_SECRET + NONCE)), as the seed's
`openssl dgst -sha256 -hmac KEY` and the official client's `createHmac('sha256', apiKey)` compute it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Protocol

from server.errors import ApiError

MAX_NONCE_DIGITS = 64
"""Room for any timestamp (nanoseconds are 19 digits) or random integer, with a bound on what is hashed."""
_NONCE = re.compile(rf"[0-9]{{1,{MAX_NONCE_DIGITS}}}")
_KEY = re.compile(r"[^\s:,#]+")


@dataclass(frozen=True)
class ApiKey:
    key: str
    secret: str | None  # None: "API key only" mode, no signature required for this key


def _parse_entry(entry: str, where: str) -> ApiKey:
    key, colon, secret = entry.partition(":")
    key, secret = key.strip(), secret.strip()
    if not colon or not _KEY.fullmatch(key) or any(c.isspace() for c in secret):
        raise ValueError(f"Malformed API key entry {where}: {entry!r}; expected 'key:secret' (or 'key:' for key-only)")
    return ApiKey(key=key, secret=secret or None)


def _add(keys: dict[str, ApiKey], api_key: ApiKey, where: str) -> None:
    known = keys.get(api_key.key)
    if known is not None and known != api_key:
        raise ValueError(f"API key {api_key.key!r} {where} is configured twice with different secrets")
    keys[api_key.key] = api_key


def load_api_keys(settings: Any) -> dict[str, ApiKey]:
    """Keys from `settings.api_keys` ("k:s,k2:s2,k3:") and `settings.api_keys_file` (one "k:s" a line)."""
    keys: dict[str, ApiKey] = {}
    for index, entry in enumerate((getattr(settings, "api_keys", None) or "").split(",")):
        if entry.strip():
            where = f"#{index + 1} in api_keys"
            _add(keys, _parse_entry(entry, where), where)
    path: Path | None = getattr(settings, "api_keys_file", None)
    if path is not None:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"Cannot read api_keys_file {path}: {exc}") from exc
        for number, line in enumerate(lines, start=1):
            if line.strip() and not line.lstrip().startswith("#"):
                where = f"at {path}:{number}"
                _add(keys, _parse_entry(line, where), where)
    return keys


def sign(api_key: str, api_secret: str, nonce: str) -> str:
    """The lowercase hex signature a client sends for this nonce."""
    return hmac.new(api_key.encode(), (api_secret + nonce).encode(), hashlib.sha256).hexdigest()


def new_key_pair() -> tuple[str, str]:
    """A fresh (key, secret); url-safe, so it fits in headers, env vars and the keys file."""
    return secrets.token_urlsafe(24), secrets.token_urlsafe(32)


class NonceStore(Protocol):
    def use(self, api_key: str, nonce: str, now: float, window: float) -> bool:
        """Record the nonce (in strict mode a request fingerprint); True if this key did not use it within
        `window` seconds."""
        ...


class MemoryNonceStore:
    """Nonces seen in this process. Expired entries are dropped; past `max_entries` the oldest go.

    Only requests with a valid signature add entries, so the cap bounds memory under heavy
    legitimate traffic rather than defending against strangers.
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        self._max_entries = max_entries
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._seen)

    def use(self, api_key: str, nonce: str, now: float, window: float) -> bool:
        entry = (api_key, nonce)
        with self._lock:
            while self._seen:
                oldest, seen_at = next(iter(self._seen.items()))
                if seen_at > now - window:
                    break
                del self._seen[oldest]
            seen_at = self._seen.get(entry)
            if seen_at is not None and seen_at > now - window:
                return False
            self._seen[entry] = now
            self._seen.move_to_end(entry)
            while len(self._seen) > self._max_entries:
                self._seen.popitem(last=False)
            return True


def _unauthorized(message: str) -> ApiError:
    return ApiError(message, code=0, http_status=401)


def _signature_token(value: str) -> str:
    """The hex digest from `x-signature`, also when sent as raw `openssl dgst` output."""
    parts = value.split()
    return parts[-1].lower() if parts else ""


NonceUnit = Literal["auto", "seconds", "milliseconds", "any"]
"""How x-nonce is read: "any" (the default) takes any decimal integer, as the seed says ("unix time or any random
integer value"); the others read it as unix time and turn the freshness window on (an operator's opt-in)."""
_MS_FROM = 10**11
"""auto: a nonce at or above this is milliseconds (10**11 s is the year 5138; 10**11 ms is 1973)."""

INVALID_CREDENTIALS = (
    "Invalid x-api-key or x-signature: use an API key configured on this server (`particalize keys create`) and "
    "x-signature = hex(HMAC-SHA256(key=API_KEY, message=API_SECRET + NONCE))."
)
"""One answer for an unknown key and a wrong signature, so that a caller cannot learn which keys exist."""


def _read_unit(nonce: str, unit: NonceUnit) -> Literal["seconds", "milliseconds"]:
    """The unit a timestamp nonce is read in (auto: by its size)."""
    return "milliseconds" if unit == "milliseconds" or (unit == "auto" and int(nonce) >= _MS_FROM) else "seconds"


def nonce_seconds(nonce: str, unit: NonceUnit) -> float | None:
    """The unix time a timestamp nonce stands for (None for unit "any": no freshness check)."""
    if unit == "any":
        return None
    return int(nonce) / 1000 if _read_unit(nonce, unit) == "milliseconds" else float(int(nonce))


def _utc(seconds: float) -> str:
    try:
        return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return "a time out of range"


def request_fingerprint(nonce: str, method: str, path: str, body: bytes) -> str:
    """What strict replay protection remembers: the nonce and the request it signed (40 hex characters).
    Two distinct requests sharing a nonce (the official client's parallel calls) differ here."""
    digest = hashlib.sha256()
    for part in (nonce.encode(), method.upper().encode(), path.encode(), body):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()[:40]


class Authenticator:
    """Checks the auth headers of one request against the configured keys.

    By default what is checked is the signature over a decimal-integer nonce, as Wiro documents ("unix time or any
    random integer value"): a nonce may repeat (the seed's sample signs once and reuses its NONCE; the official
    client's millisecond nonce is shared by parallel calls) and need not be a time. Opt-in hardening:
    `nonce_unit` seconds, milliseconds or auto reads it as a unix time that must be within `nonce_window_seconds`
    of this server's clock; `replay_protection` refuses a request identical to one seen within that window
    (same key, nonce, method, path and body).
    """

    def __init__(
        self,
        keys: dict[str, ApiKey],
        nonce_store: NonceStore,
        nonce_window_seconds: float,
        replay_protection: bool = False,
        nonce_unit: NonceUnit = "any",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._keys = dict(keys)
        self._nonces = nonce_store
        self._window = nonce_window_seconds
        self._replay_protection = replay_protection
        self._unit = nonce_unit
        self._clock = clock

    @classmethod
    def from_settings(cls, settings: Any, nonce_store: NonceStore) -> Authenticator:
        return cls(
            load_api_keys(settings), nonce_store, settings.nonce_window_seconds,
            replay_protection=settings.replay_protection, nonce_unit=settings.nonce_unit,
        )

    @property
    def open(self) -> bool:
        """No keys configured: unsigned requests are accepted (the server then binds loopback only)."""
        return not self._keys

    @property
    def strict(self) -> bool:
        """Strict replay protection is on: `check_replay` needs the request's body."""
        return self._replay_protection and not self.open

    def authenticate(self, headers: Mapping[str, str]) -> str | None:
        """The API key the request used (None in open mode); raises ApiError(401) otherwise.
        Headers only: it is decided before any body is read."""
        if self.open:
            return None
        given_key = (headers.get("x-api-key") or "").strip()
        if not given_key:
            raise _unauthorized("Missing x-api-key header: send your API key in x-api-key.")
        api_key = self._keys.get(given_key)
        if api_key is not None and api_key.secret is None:
            return api_key.key
        nonce = (headers.get("x-nonce") or "").strip()
        signature = _signature_token(headers.get("x-signature") or "")
        if not nonce or not signature:
            raise _unauthorized(
                "Signed requests need x-nonce (unix time or any random integer) and "
                "x-signature = hex(HMAC-SHA256(key=API_KEY, message=API_SECRET + NONCE))."
            )
        if not _NONCE.fullmatch(nonce):
            raise _unauthorized(self._nonce_format_message(nonce))
        secret = api_key.secret if api_key is not None else ""
        expected = sign(given_key, secret or "", nonce)
        if api_key is None or not hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace")):
            raise _unauthorized(INVALID_CREDENTIALS)
        self._check_fresh(nonce)
        return api_key.key

    def _nonce_format_message(self, nonce: str) -> str:
        kind = "unix time in seconds or milliseconds" if self._unit != "any" else "unix time or any random integer"
        sent = f"{nonce[:40]!r}" if len(nonce) <= 40 else f"{len(nonce)} characters"
        return f"x-nonce must be a decimal integer of at most {MAX_NONCE_DIGITS} digits ({kind}), got {sent}."

    def _check_fresh(self, nonce: str) -> None:
        sent = nonce_seconds(nonce, self._unit)
        if sent is None:
            return
        now = self._clock()
        if abs(now - sent) <= self._window:
            return
        unit = _read_unit(nonce, self._unit)
        raise _unauthorized(
            f"x-nonce {nonce} is outside the freshness window: read as unix time in {unit} it is {_utc(sent)}, "
            f"more than {self._window:g} seconds from this server's clock ({_utc(now)}). Send the current unix "
            "time (seconds or milliseconds) as x-nonce and sign it again."
        )

    def check_replay(self, api_key: str | None, nonce: str, method: str, path: str, body: bytes) -> None:
        """Strict mode only: refuse a request identical to one this key sent within the window."""
        if not self.strict or api_key is None or self._keys[api_key].secret is None:
            return
        fingerprint = request_fingerprint(nonce.strip(), method, path, body)
        if not self._nonces.use(api_key, fingerprint, self._clock(), self._window):
            raise _unauthorized(
                "This exact request (same x-nonce, route and body) was already received: strict replay protection "
                "is on, so send a fresh x-nonce with a new signature."
            )
