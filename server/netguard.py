"""SSRF guard for URLs that clients hand us (input images, callbackUrl).

A client-given URL must not make this server reach its own loopback, the LAN or cloud metadata.
The address check happens where the socket is opened (a wrapped httpcore network backend), so a
DNS answer that changes between check and connect (rebinding) cannot slip through, and every
redirect hop is checked the same way. TLS SNI and the Host header keep the original hostname.
"""

from __future__ import annotations

import functools
import io
import ipaddress
import re
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from typing import Any, BinaryIO

import httpcore
import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT; not "private" to Python
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_IPV4_COMPAT = ipaddress.ip_network("::/96")
_LEGACY_IPV4 = re.compile(r"[0-9a-fA-FxX.]+")  # 2130706433, 0x7f000001, 0177.1: forms inet_aton reads
_HEADERS = {"User-Agent": "particalize", "Accept": "*/*", "Accept-Encoding": "identity"}


class UnsafeUrl(ValueError):
    """The URL is not allowed: wrong scheme or form, or it points at a non-public address."""


class PrivateAddress(UnsafeUrl):
    """The URL's host is (or resolves to) an address that is not public."""


class UnresolvableHost(UnsafeUrl):
    """The URL's host name does not resolve (a typo, or a name only the client's network knows)."""


class FetchError(ValueError):
    """The URL was allowed but fetching it failed (HTTP error, too large, timeout, connection)."""


class TooLarge(FetchError):
    """The file is larger than the caller takes (`download_url`)."""


def _translated_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address that an IPv4-mapped, IPv4-compatible or NAT64 address really reaches."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _IPV4_COMPAT or any(ip in net for net in _NAT64):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _tunnelled_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 endpoints a 6to4 or Teredo address carries."""
    if ip.sixtofour is not None:
        return [ip.sixtofour]
    if ip.teredo is not None:
        return list(ip.teredo)
    return []


def is_public_address(ip: IPAddress) -> bool:
    """True for a globally routable unicast address; IPv6 forms that embed IPv4 are judged by it too."""
    if isinstance(ip, ipaddress.IPv6Address):
        translated = _translated_ipv4(ip)
        if translated is not None:
            return is_public_address(translated)
        if not all(is_public_address(inner) for inner in _tunnelled_ipv4(ip)):
            return False
    return (
        ip.is_global
        and not ip.is_private
        and not ip.is_loopback
        and not ip.is_link_local
        and not ip.is_multicast
        and not ip.is_reserved
        and not ip.is_unspecified
        and ip not in _SHARED
    )


def _literal_address(host: str) -> IPAddress | None:
    """The host as an IP address, including the legacy IPv4 spellings browsers and libc accept."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _LEGACY_IPV4.fullmatch(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def _resolve(host: str, port: int) -> list[IPAddress]:
    """Every address the host stands for; raises socket.gaierror when it does not resolve."""
    literal = _literal_address(host)
    if literal is not None:
        return [literal]
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _canon, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        address = ipaddress.ip_address(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


def _checked_addresses(host: str, port: int, allow_private: bool) -> list[IPAddress]:
    """The host's addresses, refusing the host if any of them is not public."""
    addresses = _resolve(host, port)
    if not addresses:
        raise socket.gaierror(f"no addresses for {host}")
    if not allow_private:
        for address in addresses:
            if not is_public_address(address):
                raise PrivateAddress(
                    f"URL host {host} resolves to {address}, which is not a public address; "
                    "only public http(s) URLs are allowed."
                )
    return addresses


def _parse(url: str) -> httpx.URL:
    """The URL as httpx will request it, refused unless it is plain http(s) to a host and port."""
    if not isinstance(url, str) or not url.strip():
        raise UnsafeUrl("The URL is empty.")
    try:
        parsed = httpx.URL(url.strip())
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise UnsafeUrl(f"Invalid URL {url!r}: {exc}") from exc
    if parsed.scheme not in ("http", "https"):
        raise UnsafeUrl(f"Only http and https URLs are allowed, not {url!r}.")
    if not parsed.raw_host:
        raise UnsafeUrl(f"The URL {url!r} has no host.")
    if parsed.userinfo:
        raise UnsafeUrl("URLs with credentials (user:password@) are not allowed.")
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        raise UnsafeUrl(f"The URL {url!r} has an invalid port.")
    return parsed


def _port(url: httpx.URL) -> int:
    return url.port or (443 if url.scheme == "https" else 80)


def check_url(url: str, allow_private: bool) -> None:
    """Raise UnsafeUrl unless `url` is http(s) and (unless allow_private) every address is public."""
    parsed = _parse(url)
    if allow_private:
        return
    host = parsed.raw_host.decode("ascii")
    try:
        _checked_addresses(host, _port(parsed), allow_private)
    except (OSError, UnicodeError) as exc:
        raise UnresolvableHost(f"The URL host {host} could not be resolved.") from exc


class _GuardedBackend(httpcore.SyncBackend):
    """Resolves the host itself, checks every address, and connects only to a checked one."""

    def __init__(self, allow_private: bool) -> None:
        self._allow_private = allow_private

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        try:
            addresses = _checked_addresses(host, port, self._allow_private)
        except (OSError, UnicodeError) as exc:
            raise httpcore.ConnectError(f"could not resolve {host}: {exc}") from exc
        failure: Exception | None = None
        for address in addresses:
            try:
                return super().connect_tcp(str(address), port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None
        raise failure


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """One verifying TLS context for every fetch: building one loads the CA bundle (~40 ms)."""
    return httpx.create_ssl_context()


class _GuardedTransport(httpx.HTTPTransport):
    """httpx's transport with its connection pool on the guarded backend (no env proxies)."""

    def __init__(self, allow_private: bool) -> None:
        super().__init__(verify=_ssl_context(), trust_env=False)  # its own pool, replaced here
        self._pool = httpcore.ConnectionPool(
            ssl_context=_ssl_context(),
            network_backend=_GuardedBackend(allow_private),
        )


def _client(timeout: float, allow_private: bool) -> httpx.Client:
    return httpx.Client(
        transport=_GuardedTransport(allow_private),
        timeout=timeout,
        follow_redirects=False,
        trust_env=False,
        headers=_HEADERS,
    )


def fetch_url(
    url: str, *, max_bytes: int, timeout: float, allow_private: bool, max_redirects: int = 5
) -> tuple[bytes, str]:
    """GET `url` (following up to `max_redirects` checked redirects): (body, content-type)."""
    body = io.BytesIO()
    _, content_type = _get(url, body.write, max_bytes=max_bytes, timeout=timeout, allow_private=allow_private,
                           max_redirects=max_redirects)
    return body.getvalue(), content_type


def download_url(
    url: str, out: BinaryIO, *, max_bytes: int, timeout: float, allow_private: bool,
    allow_host: Callable[[str], bool] | None = None, max_redirects: int = 5,
) -> int:
    """GET `url` into `out` chunk by chunk (nothing held in memory), following up to `max_redirects` checked
    redirects, each hop's host also held to `allow_host` when given (UnsafeUrl naming it); the bytes written.
    FetchError when it answers an error, is larger than `max_bytes` or takes longer than `timeout` in all."""
    size, _ = _get(url, out.write, max_bytes=max_bytes, timeout=timeout, allow_private=allow_private,
                   allow_host=allow_host, max_redirects=max_redirects)
    return size


def _get(
    url: str, write: Callable[[bytes], object], *, max_bytes: int, timeout: float, allow_private: bool,
    allow_host: Callable[[str], bool] | None = None, max_redirects: int = 5,
) -> tuple[int, str]:
    """The one checked GET behind both: every hop's address guarded, the size and the whole time capped;
    (bytes written, content-type)."""
    deadline = time.monotonic() + timeout
    current = url
    with _client(timeout, allow_private) as client:
        for _hop in range(max_redirects + 1):
            target = _parse(current)
            host = target.host
            if allow_host is not None and not allow_host(host):
                raise UnsafeUrl(f"{current} is on host {host}, which is not on this server's list of allowed hosts.")
            try:
                with client.stream("GET", target) as response:
                    if response.is_redirect:
                        current = str(response.url.join(response.headers["location"]))
                        continue
                    if not response.is_success:
                        raise FetchError(f"{current} answered HTTP {response.status_code}.")
                    declared = response.headers.get("content-length", "").strip()
                    if declared.isdigit() and int(declared) > max_bytes:
                        raise TooLarge(f"{current} is larger than {max_bytes} bytes ({declared} bytes).")
                    size = 0
                    for chunk in response.iter_bytes():
                        size += len(chunk)
                        if size > max_bytes:
                            raise TooLarge(f"{current} is larger than {max_bytes} bytes.")
                        if time.monotonic() > deadline:
                            raise FetchError(f"Fetching {current} took too long.")
                        write(chunk)
                    return size, response.headers.get("content-type", "")
            except httpx.TimeoutException as exc:
                raise FetchError(f"Fetching {current} timed out.") from exc
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                raise FetchError(f"Could not fetch {current}: {exc}") from exc
    raise FetchError(f"Too many redirects (more than {max_redirects}) fetching {url}.")


def post_json(url: str, body: dict[str, Any], *, timeout: float, allow_private: bool) -> int:
    """POST `body` as JSON to `url` and return the HTTP status; redirects are not followed."""
    target = _parse(url)
    with _client(timeout, allow_private) as client:
        try:
            with client.stream("POST", target, json=body) as response:
                return response.status_code
        except httpx.TimeoutException as exc:
            raise FetchError(f"POST to {url} timed out.") from exc
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise FetchError(f"Could not POST to {url}: {exc}") from exc
