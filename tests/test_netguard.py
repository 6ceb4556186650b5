"""Specification of the SSRF guard: client-given URLs may only reach public http(s) addresses.

No test touches real DNS or the internet: `socket.getaddrinfo` is replaced by a fixed table,
and fetches go to a throwaway HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlencode

import pytest

from server import netguard
from server.errors import ApiError
from server.netguard import FetchError, UnsafeUrl, check_url, fetch_url, post_json
from server.validation import check_public_url
from tests.loopback import LoopbackServer

PUBLIC_V4 = "93.184.216.34"
IMAGE = b"\x89PNG\r\n\x1a\n" + b"pixels" * 10
_real_getaddrinfo = socket.getaddrinfo

FAKE_DNS: dict[str, list[str]] = {
    "localhost": ["127.0.0.1", "::1"],
    "internal.example": ["10.1.2.3"],
    "metadata.example": ["169.254.169.254"],
    "mixed.example": [PUBLIC_V4, "127.0.0.1"],
    "public.example": [PUBLIC_V4],
    "public6.example": ["2001:4860:4860::8888"],
    "loopback-named.example": ["127.0.0.1"],
    "public-origin.example": ["127.0.0.2"],
}

PRIVATE_ADDRESSES = [
    "127.0.0.1", "127.255.255.254", "10.0.0.1", "10.255.255.255", "172.16.0.1", "172.31.255.254", "192.168.0.1",
    "192.168.255.255", "100.64.0.1", "100.127.255.254", "169.254.169.254", "169.254.0.1", "0.0.0.0", "::1", "::",
    "::ffff:127.0.0.1", "::ffff:7f00:1", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "fe80::1", "febf::1",
    "fc00::1", "fdff::1", "64:ff9b::7f00:1", "64:ff9b::a00:1", "64:ff9b::a9fe:a9fe", "2002:7f00:1::",
    "2002:a00:1::", "2002:c0a8:1::", "2002:a9fe:a9fe::",
]
"""Loopback, private ranges (10/8, 172.16/12, 192.168/16, 100.64/10), link-local and cloud metadata,
unspecified, and their IPv6 forms: mapped, link-local, unique-local, NAT64 and 6to4 embeddings."""
PRIVATE_NAMES = {f"private-{index}.example": address for index, address in enumerate(PRIVATE_ADDRESSES)}
FAKE_DNS.update({name: [address] for name, address in PRIVATE_NAMES.items()})


def _url_of(address: str) -> str:
    return f"http://[{address}]/" if ":" in address else f"http://{address}/"


PRIVATE_TARGETS = [
    *(_url_of(address) for address in PRIVATE_ADDRESSES),
    "http://127.1/", "http://2130706433/", "http://0x7f000001/", "http://017700000001/", "http://0177.0.0.1/",
    "http://localhost/", *(f"http://{name}/" for name in PRIVATE_NAMES),
]
"""Every way tested of naming a non-public address: literals, legacy IPv4 spellings, and DNS names."""


class FakeResolver:
    """getaddrinfo over FAKE_DNS (plus per-test answers); IP literals go to the real resolver."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.sequences: dict[str, list[list[str]]] = {}

    def __call__(self, host, port, family=0, type=0, proto=0, flags=0):
        name = host.decode() if isinstance(host, bytes) else str(host)
        try:
            ipaddress.ip_address(name.split("%")[0])
            return _real_getaddrinfo(host, port, family, type, proto, flags)
        except ValueError:
            pass
        self.calls.append(name)
        if self.sequences.get(name):
            answers = self.sequences[name].pop(0)
        elif name in FAKE_DNS:
            answers = FAKE_DNS[name]
        else:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        results = []
        for address in answers:
            if ":" in address:
                results.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port or 0, 0, 0)))
            else:
                results.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port or 0)))
        return results


@pytest.fixture(autouse=True)
def resolver(monkeypatch: pytest.MonkeyPatch) -> FakeResolver:
    fake = FakeResolver()
    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return fake


_real_connect = socket.socket.connect


@pytest.fixture(autouse=True)
def tripwire(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Sockets may connect to loopback only: an address the guard let through is recorded, never reached."""
    attempts: list[str] = []

    def connect(sock: socket.socket, address: object) -> object:
        host = address[0] if isinstance(address, tuple) else ""
        if host and not ipaddress.ip_address(host.split("%")[0]).is_loopback:
            attempts.append(host)
            raise ConnectionRefusedError(f"test tripwire: no traffic to {host}")
        return _real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    yield attempts
    assert attempts == [], f"the guard let connections through to {attempts}"


@pytest.fixture
def loopback_is_public(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let 127.0.0.1 (only) pass as public, so the local test server stands in for the internet."""
    strict = netguard.is_public_address
    monkeypatch.setattr(netguard, "is_public_address", lambda ip: str(ip) == "127.0.0.1" or strict(ip))


def _redirect(path: str) -> tuple[int, bytes, dict[str, str]]:
    """/redirect/<status>?to=<url>: answer that redirect."""
    status, _, query = path.removeprefix("/redirect/").partition("?")
    return int(status), b"", {"Location": parse_qs(query)["to"][0]}


def redirect_path(status: int, target: str) -> str:
    return f"/redirect/{status}?{urlencode({'to': target})}"


class Recorder(BaseHTTPRequestHandler):
    requests: list[tuple[str, str, str, bytes]] = []

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if "nolength" not in self.path:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        Recorder.requests.append(("GET", self.path, self.headers.get("Host", ""), b""))
        routes = {
            "/image": (200, IMAGE, {"Content-Type": "image/png"}),
            "/big": (200, b"x" * 5000, {}),
            "/big-nolength": (200, b"x" * 5000, {}),
            "/missing": (404, b"not here", {}),
            "/to-image": (302, b"", {"Location": "/image"}),
            "/to-metadata": (302, b"", {"Location": "http://169.254.169.254/latest/meta-data/"}),
            "/to-internal-name": (301, b"", {"Location": "http://internal.example/x"}),
            "/to-ftp": (302, b"", {"Location": "ftp://example.com/file"}),
            "/loop": (302, b"", {"Location": "/loop"}),
        }
        if self.path == "/slow":
            time.sleep(1.5)
        if self.path.startswith("/redirect/"):
            self._send(*_redirect(self.path))
            return
        status, body, headers = routes.get(self.path, (200, b"slow", {}))
        self._send(status, body, headers)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        Recorder.requests.append(("POST", self.path, self.headers.get("Content-Type", ""), body))
        if self.path == "/to-image":
            self._send(307, headers={"Location": "/image"})
        elif self.path.startswith("/redirect/"):
            self._send(*_redirect(self.path))
        else:
            self._send(204)


@pytest.fixture(scope="module")
def origin() -> Iterator[str]:
    server = LoopbackServer(Recorder)
    yield f"http://127.0.0.1:{server.port}"
    server.close()


@pytest.fixture
def seen(origin: str) -> list[tuple[str, str, str, bytes]]:
    Recorder.requests.clear()
    return Recorder.requests


REFUSED = [
    "http://127.0.0.1/",
    "http://localhost/",
    "http://[::1]/",
    "http://10.0.0.1/",
    "http://172.16.5.4/",
    "http://172.31.255.255/",
    "http://192.168.1.1/",
    "http://169.254.169.254/latest/meta-data/",
    "http://0.0.0.0/",
    "http://[::]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:10.0.0.1]/",
    "http://[::127.0.0.1]/",
    "http://[64:ff9b::7f00:1]/",
    "http://[2002:7f00:1::]/",
    "http://[fe80::1]/",
    "http://[fc00::1]/",
    "http://2130706433/",
    "http://0x7f000001/",
    "http://0177.0.0.1/",
    "http://127.1/",
    "http://017700000001/",
    "http://0/",
    "http://[::ffff:7f00:1]/",
    "http://[::ffff:169.254.169.254]/",
    "http://[64:ff9b::a00:1]/",
    "http://[64:ff9b::a9fe:a9fe]/",
    "http://[2002:a00:1::]/",
    "http://[2002:c0a8:101::]/",
    "http://[febf::1]/",
    "http://[fdff::1]/",
    "http://[fe80::1%25eth0]/",
    "http://100.64.0.1/",
    "http://100.127.255.254/",
    "http://224.0.0.1/",
    "http://240.0.0.1/",
    "http://255.255.255.255/",
    "ftp://example.com/file",
    "file:///etc/passwd",
    "gopher://public.example/",
    "http://user:pw@public.example/",
    "http://user@public.example/",
    "http:///nohost",
    "http://public.example:0/",
    "http://public.example:65536/",
    "http://loopback-named.example/",
    "http://internal.example/",
    "http://metadata.example/",
    "http://mixed.example/",
    "http://no-such-host.example/",
    "",
    "not a url",
]


@pytest.mark.parametrize("url", REFUSED)
def test_check_url_refuses(url: str) -> None:
    with pytest.raises(UnsafeUrl):
        check_url(url, allow_private=False)


@pytest.mark.parametrize("url", [u for u in REFUSED if "no-such-host" not in u])
def test_fetch_url_refuses_without_connecting(url: str, seen: list) -> None:
    with pytest.raises(UnsafeUrl):
        fetch_url(url, max_bytes=1000, timeout=2, allow_private=False)
    assert seen == []


@pytest.mark.parametrize(
    "url",
    [
        "http://public.example/dog.jpg",
        "https://public.example:8443/a?b=c",
        "http://public6.example/",
        "http://8.8.8.8/",
        "https://[2001:4860:4860::8888]/",
        "http://[::ffff:8.8.8.8]/",
    ],
)
def test_check_url_accepts_public_addresses(url: str) -> None:
    check_url(url, allow_private=False)


def test_allow_private_lets_loopback_through(origin: str, seen: list) -> None:
    check_url(f"{origin}/image", allow_private=True)
    data, content_type = fetch_url(f"{origin}/image", max_bytes=1000, timeout=5, allow_private=True)
    assert data == IMAGE
    assert content_type == "image/png"
    assert [request[:2] for request in seen] == [("GET", "/image")]


def test_unresolvable_host_is_a_fetch_error() -> None:
    with pytest.raises(FetchError):
        fetch_url("http://no-such-host.example/", max_bytes=1000, timeout=2, allow_private=False)


@pytest.mark.usefixtures("loopback_is_public")
def test_redirect_to_private_address_is_refused(origin: str, seen: list) -> None:
    with pytest.raises(UnsafeUrl, match="169.254.169.254"):
        fetch_url(f"{origin}/to-metadata", max_bytes=1000, timeout=5, allow_private=False)
    assert [request[1] for request in seen] == ["/to-metadata"]


@pytest.mark.usefixtures("loopback_is_public")
def test_redirect_to_name_resolving_private_is_refused(origin: str, seen: list) -> None:
    with pytest.raises(UnsafeUrl, match="10.1.2.3"):
        fetch_url(f"{origin}/to-internal-name", max_bytes=1000, timeout=5, allow_private=False)
    assert [request[1] for request in seen] == ["/to-internal-name"]


@pytest.mark.usefixtures("loopback_is_public")
def test_redirect_to_other_scheme_is_refused(origin: str) -> None:
    with pytest.raises(UnsafeUrl, match="http and https"):
        fetch_url(f"{origin}/to-ftp", max_bytes=1000, timeout=5, allow_private=False)


@pytest.mark.usefixtures("loopback_is_public")
def test_allowed_redirect_is_followed(origin: str, seen: list) -> None:
    data, _ = fetch_url(f"{origin}/to-image", max_bytes=1000, timeout=5, allow_private=False)
    assert data == IMAGE
    assert [request[1] for request in seen] == ["/to-image", "/image"]


def test_redirect_loop_stops_at_max_redirects(origin: str, seen: list) -> None:
    with pytest.raises(FetchError, match="Too many redirects"):
        fetch_url(f"{origin}/loop", max_bytes=1000, timeout=5, allow_private=True, max_redirects=3)
    assert len(seen) == 4


@pytest.mark.usefixtures("loopback_is_public")
def test_connects_to_the_checked_address_keeping_the_hostname(origin: str, seen: list) -> None:
    port = origin.rsplit(":", 1)[1]
    url = f"http://loopback-named.example:{port}/image"
    data, _ = fetch_url(url, max_bytes=1000, timeout=5, allow_private=False)
    assert data == IMAGE
    assert seen[0][2] == f"loopback-named.example:{port}"


def test_dns_rebinding_after_the_check_is_refused(origin: str, seen: list, resolver: FakeResolver) -> None:
    port = origin.rsplit(":", 1)[1]
    resolver.sequences["rebind.example"] = [[PUBLIC_V4], ["127.0.0.1"]]
    url = f"http://rebind.example:{port}/image"
    check_url(url, allow_private=False)
    with pytest.raises(UnsafeUrl, match="127.0.0.1"):
        fetch_url(url, max_bytes=1000, timeout=5, allow_private=False)
    assert seen == []


@pytest.mark.parametrize("path", ["/big", "/big-nolength"])
def test_max_bytes_is_enforced(origin: str, path: str) -> None:
    with pytest.raises(FetchError, match="larger than 4096 bytes"):
        fetch_url(f"{origin}{path}", max_bytes=4096, timeout=5, allow_private=True)
    data, _ = fetch_url(f"{origin}{path}", max_bytes=5000, timeout=5, allow_private=True)
    assert len(data) == 5000


def test_http_error_status_is_a_fetch_error(origin: str) -> None:
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch_url(f"{origin}/missing", max_bytes=1000, timeout=5, allow_private=True)


def test_slow_server_times_out(origin: str) -> None:
    started = time.monotonic()
    with pytest.raises(FetchError, match="timed out"):
        fetch_url(f"{origin}/slow", max_bytes=1000, timeout=0.3, allow_private=True)
    assert time.monotonic() - started < 1.4


def test_environment_proxies_are_ignored(origin: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://10.9.9.9:3128")
    monkeypatch.setenv("ALL_PROXY", "http://10.9.9.9:3128")
    data, _ = fetch_url(f"{origin}/image", max_bytes=1000, timeout=5, allow_private=True)
    assert data == IMAGE


def test_post_json_sends_json_and_returns_status(origin: str, seen: list) -> None:
    status = post_json(f"{origin}/hook", {"taskid": "7", "result": True}, timeout=5, allow_private=True)
    assert status == 204
    method, path, content_type, body = seen[0]
    assert (method, path, content_type) == ("POST", "/hook", "application/json")
    assert json.loads(body) == {"taskid": "7", "result": True}


def test_post_json_does_not_follow_redirects(origin: str, seen: list) -> None:
    assert post_json(f"{origin}/to-image", {}, timeout=5, allow_private=True) == 307
    assert [request[1] for request in seen] == ["/to-image"]


def test_post_json_refuses_private_addresses(origin: str, seen: list) -> None:
    with pytest.raises(UnsafeUrl):
        post_json(f"{origin}/hook", {}, timeout=5, allow_private=False)
    with pytest.raises(UnsafeUrl):
        post_json("http://metadata.example/hook", {}, timeout=5, allow_private=False)
    assert seen == []


def test_post_json_connection_failure_is_a_fetch_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    with pytest.raises(FetchError):
        post_json(f"http://127.0.0.1:{closed_port}/", {}, timeout=2, allow_private=True)


# --- every non-public target, for image URLs and callbackUrl alike ----------------------------------------------

REDIRECTS = [301, 302, 307, 308]
PUBLIC_STAND_IN = "127.0.0.2"
"""A second loopback address that plays a public host, so that 127.0.0.1 in every spelling stays private."""


@pytest.fixture(scope="module")
def public_origin() -> Iterator[str]:
    """A test server on 127.0.0.2, named public-origin.example (Linux routes all of 127/8 to loopback)."""
    try:
        server = LoopbackServer(Recorder, PUBLIC_STAND_IN)
    except OSError as exc:
        pytest.skip(f"cannot listen on {PUBLIC_STAND_IN}: {exc}")
    yield f"http://public-origin.example:{server.port}"
    server.close()


@pytest.fixture
def stand_in_is_public(monkeypatch: pytest.MonkeyPatch) -> None:
    strict = netguard.is_public_address
    monkeypatch.setattr(netguard, "is_public_address", lambda ip: str(ip) == PUBLIC_STAND_IN or strict(ip))


@pytest.mark.parametrize("url", PRIVATE_TARGETS)
def test_every_private_target_is_refused_for_image_fetches_and_callback_posts(url: str, seen: list) -> None:
    with pytest.raises(UnsafeUrl):
        check_url(url, allow_private=False)
    with pytest.raises(UnsafeUrl):
        fetch_url(url, max_bytes=1000, timeout=2, allow_private=False)
    with pytest.raises(UnsafeUrl):
        post_json(url, {"result": True}, timeout=2, allow_private=False)
    assert seen == []


@pytest.mark.parametrize("field", ["inputImageUrl", "callbackUrl"])
@pytest.mark.parametrize("url", PRIVATE_TARGETS)
def test_run_refuses_every_private_target_as_image_url_and_as_callback_url(field: str, url: str) -> None:
    with pytest.raises(ApiError) as refused:
        check_public_url(field, url, allow_private=False)
    assert refused.value.code == 0 and f"[{field}] must be a " in refused.value.message


@pytest.mark.usefixtures("stand_in_is_public")
@pytest.mark.parametrize("status", REDIRECTS)
@pytest.mark.parametrize("target", PRIVATE_TARGETS)
def test_a_redirect_from_a_public_name_to_a_private_target_is_refused(
    public_origin: str, seen: list, status: int, target: str
) -> None:
    path = redirect_path(status, target + "latest/meta-data/")
    # UnsafeUrl; FetchError where httpx itself refuses the Location (a legacy IPv4 spelling such as 0177.0.0.1)
    with pytest.raises((UnsafeUrl, FetchError)):
        fetch_url(public_origin + path, max_bytes=1000, timeout=5, allow_private=False)
    assert [request[:2] for request in seen] == [("GET", path)], "only the public hop was made"


@pytest.mark.usefixtures("stand_in_is_public")
@pytest.mark.parametrize("status", REDIRECTS)
def test_a_redirect_to_a_public_target_is_followed(public_origin: str, seen: list, status: int) -> None:
    path = redirect_path(status, f"{public_origin}/image")
    data, _ = fetch_url(public_origin + path, max_bytes=1000, timeout=5, allow_private=False)
    assert data == IMAGE and [request[1] for request in seen] == [path, "/image"]


@pytest.mark.usefixtures("stand_in_is_public")
@pytest.mark.parametrize("status", REDIRECTS)
def test_a_callback_answered_with_a_redirect_is_not_followed(public_origin: str, seen: list, status: int) -> None:
    path = redirect_path(status, "http://169.254.169.254/latest/meta-data/")
    assert post_json(public_origin + path, {"taskid": "1"}, timeout=5, allow_private=False) == status
    assert [request[:2] for request in seen] == [("POST", path)]
