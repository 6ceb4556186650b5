"""A Run's `loras`: LoRAs sent with one request (PARTICALIZE_REQUEST_LORAS=1, on a tool that takes them), read into
the task's record at Run, or refused there (code 0) saying why.

Wiro clients send every value as a string (multipart forms, the seed's JSON-as-multipart, JSON with string values),
so `loras` is read from any of:

- a JSON list (a real one in a JSON body, or the same text in a string): each item an object
  `{"url": "https://...", "strength": 0.8, "sha256": "<64 hex digits>"}` (strength and sha256 optional) or a
  string as below;
- plain text `URL[:STRENGTH],URL[:STRENGTH]` (as PARTICALIZE_LORAS writes a stack): a strength is the number after
  the URL's last `:` (`https://host/a.safetensors:0.8`); a URL holding a comma needs the JSON form.

Empty (`""`, `[]`) is the same as leaving it out. Every URL must be http(s), on one of the operator's hosts
(PARTICALIZE_REQUEST_LORA_HOSTS) and at a public address (the image URLs' guard, server/netguard.py); at most
PARTICALIZE_REQUEST_LORA_MAX_COUNT of them, each strength between 0 and 4. The files are downloaded, checked and
cached by the worker (server/worker/request_loras.py).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any
from urllib.parse import urlsplit

from server.bodies import RequestFields
from server.errors import ApiError
from server.limits import RequestLimits, RequestLoraOptions
from server.netguard import PrivateAddress, UnresolvableHost, UnsafeUrl, check_url
from server.task_record import RequestLora
from server.tool_info import Tool

FIELD = "loras"
MAX_STRENGTH = 4.0
MAX_URL_CHARS = 2048
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ITEM_KEYS = ("url", "strength", "sha256")
_FORMS = ('send a JSON list such as [{"url": "https://host/effect.safetensors", "strength": 0.8}], or text such '
          "as https://host/a.safetensors:0.8,https://host/b.safetensors")


def _refused(message: str, index: int | None = None) -> ApiError:
    where = f"[{FIELD}]" if index is None else f"[{FIELD}] item {index + 1}"
    return ApiError(f"Request parameter {where} {message}")


def sent_loras(fields: RequestFields) -> bool:
    """Whether the request sends `loras` with something in it."""
    if FIELD in fields.files:
        return True
    value = fields.values.get(FIELD)
    return value is not None and value != [] and not (isinstance(value, str) and value.strip() in ("", "[]"))


def parse_request_loras(fields: RequestFields, tool: Tool, limits: RequestLimits) -> tuple[RequestLora, ...]:
    """The request's LoRAs, checked (none when it sends none); ApiError (code 0) saying what is wrong: request
    LoRAs off on this server or for this tool, a malformed list, too many, a strength out of range, a URL that is
    not http(s), on a host not allowed or at a private address."""
    if not sent_loras(fields):
        return ()
    options = limits.request_loras
    if not options.enabled:
        raise _refused("is not accepted: request LoRAs are disabled on this server (an operator turns them on with "
                       "PARTICALIZE_REQUEST_LORAS=1 and PARTICALIZE_REQUEST_LORA_HOSTS).")
    if not tool.request_loras:
        raise _refused(f"is not accepted: tool {tool.slug} does not take request LoRAs (its catalogue entry would "
                       "need request_loras = true).")
    if FIELD in fields.files:
        raise _refused(f"must be a text value, not a file part: {_FORMS}.")
    items = _items(fields.values[FIELD])
    if len(items) > options.max_count:
        raise _refused(f"lists {len(items)} LoRAs; this server takes at most {options.max_count} per request.")
    loras = tuple(_lora(item, index) for index, item in enumerate(items))
    for index, lora in enumerate(loras):
        check_lora_url(lora.url, options, index)
    return loras


def _items(value: Any) -> list[Any]:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except ValueError as exc:
                raise _refused(f"is not a valid JSON list ({exc}); {_FORMS}.") from None
        else:
            return [item.strip() for item in text.split(",") if item.strip()]
    if not isinstance(value, list):
        raise _refused(f"must be a list, not a JSON {type(value).__name__}; {_FORMS}.")
    return value


def _lora(item: Any, index: int) -> RequestLora:
    if isinstance(item, str):
        url, strength = _url_and_strength(item.strip(), index)
        return RequestLora(url=url, strength=strength)
    if not isinstance(item, dict):
        raise _refused(f"must be a URL text or an object with a url, not a JSON {type(item).__name__}.", index)
    unknown = sorted(set(item) - set(_ITEM_KEYS))
    if unknown:
        raise _refused(f"has unknown keys {unknown} (known: {', '.join(_ITEM_KEYS)}).", index)
    url = item.get("url")
    if not isinstance(url, str) or not url.strip():
        raise _refused('needs a "url" text.', index)
    strength = _strength(item.get("strength", 1.0), index)
    sha256 = item.get("sha256")
    if sha256 is not None and (not isinstance(sha256, str) or not _SHA256.fullmatch(sha256.strip().lower())):
        raise _refused('"sha256" must be the file\'s SHA-256 as 64 hexadecimal digits.', index)
    return RequestLora(url=url.strip(), strength=strength, sha256=sha256.strip().lower() if sha256 else None)


def _url_and_strength(text: str, index: int) -> tuple[str, float]:
    """`URL[:STRENGTH]`: the part after the last `:` is a strength when what is before it is a URL with a path
    (so `http://host:8080/a.safetensors` keeps its port)."""
    head, sep, tail = text.rpartition(":")
    if sep and re.fullmatch(r"\s*[-+]?[0-9.eE+-]+\s*", tail) and urlsplit(head).path not in ("", "/"):
        return head, _strength(tail, index)
    return text, 1.0


def _strength(value: Any, index: int) -> float:
    if isinstance(value, bool):
        raise _refused("strength must be a number.", index)
    try:
        strength = float(value)
    except (TypeError, ValueError):
        raise _refused(f"strength {value!r} is not a number.", index) from None
    if not math.isfinite(strength) or not 0.0 <= strength <= MAX_STRENGTH:
        raise _refused(f"strength must be between 0 and {MAX_STRENGTH:g}, got {value}.", index)
    return strength


def check_lora_url(url: str, options: RequestLoraOptions, index: int) -> None:
    """ApiError unless `url` is a plain http(s) URL on an allowed host whose addresses are public."""
    if len(url) > MAX_URL_CHARS:
        raise _refused(f"URL must be at most {MAX_URL_CHARS} characters long.", index)
    if not url.lower().startswith(("http://", "https://")):
        raise _refused(f"must be an http(s) URL, got {url[:60]!r}.", index)
    host = (urlsplit(url).hostname or "").lower()
    if not options.allows_host(host):
        raise _refused(f"is on host {host!r}, which is not on this server's list of hosts request LoRAs may come "
                       f"from ({', '.join(options.hosts)}; PARTICALIZE_REQUEST_LORA_HOSTS).", index)
    try:
        check_url(url, options.allow_private_urls)
    except UnresolvableHost:
        raise _refused(f"is on host {host!r}, which could not be resolved from this server.", index) from None
    except PrivateAddress as exc:
        raise _refused(f"must be a public http(s) URL: {exc}", index) from None
    except UnsafeUrl as exc:
        raise _refused(f"must be a plain http(s) URL: {exc}", index) from None
