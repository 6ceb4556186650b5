"""The start image of an offline run (`generate --image`, a batch row's `image`): a file path or an http(s) URL.

The operator's own input, so it is fetched as given (redirects followed); the server's guarded fetch
(server.netguard) is for URLs that clients send."""

from __future__ import annotations

from pathlib import Path


def read_image_source(source: str) -> bytes:
    if source.startswith(("http://", "https://")):
        import httpx

        response = httpx.get(source, follow_redirects=True, timeout=60)
        response.raise_for_status()
        return response.content
    return Path(source).expanduser().read_bytes()
