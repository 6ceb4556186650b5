"""Specification of Wiro-style request authentication (x-api-key, x-nonce, x-signature)."""

from __future__ import annotations

import secrets
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
from starlette.datastructures import Headers

from server.auth import (
    INVALID_CREDENTIALS,
    MAX_NONCE_DIGITS,
    ApiKey,
    Authenticator,
    MemoryNonceStore,
    load_api_keys,
    new_key_pair,
    sign,
)
from server.errors import ApiError

KEY, SECRET = "test-key", "test-secret"
KEY_ONLY = "plain-key"


NOW = 1_790_000_000.0
"""The server's clock in these tests (2026-09-21): nonces are read against it."""


OTHER_SIGNED = "other-key"


def make_auth(replay_protection: bool = False, window: float = 300, unit: str = "any") -> Authenticator:
    """As the server runs by default (unit "any": no freshness window); unit seconds/milliseconds/auto: opt-in."""
    keys = {KEY: ApiKey(KEY, SECRET), KEY_ONLY: ApiKey(KEY_ONLY, None), OTHER_SIGNED: ApiKey(OTHER_SIGNED, "s2")}
    return Authenticator(keys, MemoryNonceStore(), window, replay_protection=replay_protection, nonce_unit=unit,
                         clock=lambda: NOW)


def seconds_nonce(offset: float = 0) -> str:
    return str(int(NOW + offset))


def ms_nonce(offset: float = 0) -> str:
    return str(int((NOW + offset) * 1000))


def signed_headers(nonce: str, signature: str | None = None, key: str = KEY) -> Headers:
    return Headers({"X-Api-Key": key, "X-Nonce": nonce, "X-Signature": signature or sign(key, SECRET, nonce)})


def refused(auth: Authenticator, headers: Headers) -> ApiError:
    with pytest.raises(ApiError) as caught:
        auth.authenticate(headers)
    assert caught.value.http_status == 401
    assert caught.value.code == 0
    return caught.value


def openssl_line(nonce: str) -> str:
    """What the seed's `echo -n "${SECRET}${NONCE}" | openssl dgst -sha256 -hmac "${KEY}"` prints."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    result = subprocess.run(
        ["openssl", "dgst", "-sha256", "-hmac", KEY],
        input=(SECRET + nonce).encode(),
        capture_output=True,
        check=True,
    )
    return result.stdout.decode().strip()


def test_sign_matches_the_seeds_openssl_command() -> None:
    nonce = str(int(time.time()))
    assert sign(KEY, SECRET, nonce) == openssl_line(nonce).split()[-1]


def test_sign_is_lowercase_hex_sha256() -> None:
    signature = sign(KEY, SECRET, "1")
    assert len(signature) == 64
    assert signature == signature.lower()
    int(signature, 16)


def test_raw_openssl_output_is_accepted_as_signature() -> None:
    nonce = seconds_nonce()
    line = openssl_line(nonce)
    assert "=" in line  # "SHA2-256(stdin)= <hex>" or "(stdin)= <hex>", exactly as the seed sends it
    assert make_auth().authenticate(signed_headers(nonce, line)) == KEY


def test_signature_is_case_insensitive_hex() -> None:
    nonce = seconds_nonce()
    assert make_auth().authenticate(signed_headers(nonce, sign(KEY, SECRET, nonce).upper())) == KEY


def test_fresh_millisecond_nonces_are_accepted_like_the_official_client_sends() -> None:
    auth = make_auth()
    first = ms_nonce()
    second = str(int(first) + 1)
    assert auth.authenticate(signed_headers(first)) == KEY
    assert auth.authenticate(signed_headers(second)) == KEY


def test_wrong_signature_is_refused() -> None:
    error = refused(make_auth(), signed_headers(seconds_nonce(), "0" * 64))
    assert "x-signature" in error.message


def test_signature_for_another_nonce_is_refused() -> None:
    refused(make_auth(), signed_headers(seconds_nonce(), sign(KEY, SECRET, seconds_nonce(-1))))


def test_unknown_key_is_refused() -> None:
    error = refused(make_auth(), signed_headers(seconds_nonce(), key="nobody"))
    assert error.message == INVALID_CREDENTIALS


def test_missing_key_is_refused() -> None:
    error = refused(make_auth(), Headers({}))
    assert "x-api-key" in error.message


def test_a_reused_seconds_nonce_is_accepted_as_the_seeds_sample_signs_once() -> None:
    auth = make_auth()
    headers = signed_headers(seconds_nonce())
    for _ in range(3):  # Run, Detail, Kill with one NONCE and one SIGNATURE
        assert auth.authenticate(headers) == KEY


def test_parallel_calls_sharing_one_millisecond_nonce_are_all_accepted() -> None:
    auth = make_auth()
    headers = signed_headers(ms_nonce())
    with ThreadPoolExecutor(10) as pool:
        assert list(pool.map(lambda _: auth.authenticate(headers), range(10))) == [KEY] * 10


@pytest.mark.parametrize(("nonce", "unit", "reads_as"), [
    ("1000", "seconds", "1970-01-01T00:16:40Z"),
    (seconds_nonce(-301), "seconds", "2026-09-21T14:08:19Z"),
    (ms_nonce(+400), "milliseconds", "2026-09-21T14:20:00Z"),
    (str(9 * 10**15), "milliseconds", "a time out of range"),
])
def test_the_opt_in_window_refuses_a_stale_timestamp_saying_so(nonce: str, unit: str, reads_as: str) -> None:
    error = refused(make_auth(unit="auto"), signed_headers(nonce))
    assert error.message == (
        f"x-nonce {nonce} is outside the freshness window: read as unix time in {unit} it is {reads_as}, more than "
        "300 seconds from this server's clock (2026-09-21T14:13:20Z). Send the current unix time (seconds or "
        "milliseconds) as x-nonce and sign it again."
    )


def test_nonces_within_the_opt_in_window_in_seconds_and_milliseconds_pass() -> None:
    auth = make_auth(unit="auto")
    for nonce in (seconds_nonce(-299), seconds_nonce(299), ms_nonce(-299), ms_nonce(299)):
        assert auth.authenticate(signed_headers(nonce)) == KEY


def test_the_nonce_unit_is_configurable() -> None:
    assert make_auth(unit="milliseconds").authenticate(signed_headers(ms_nonce())) == KEY
    refused(make_auth(unit="milliseconds"), signed_headers(seconds_nonce()))
    refused(make_auth(unit="seconds"), signed_headers(ms_nonce()))
    assert make_auth(unit="any").authenticate(signed_headers("42")) == KEY, "any integer, no freshness check"


SEED_NONCES = {
    "a small integer": "12345",
    "a random 9-digit integer": str(secrets.randbelow(9 * 10**8) + 10**8),
    "the time in nanoseconds": str(time.time_ns()),
    "a timestamp two hours old": seconds_nonce(-7200),
    "a millisecond timestamp a day ahead": ms_nonce(86400),
    "zero": "0",
    "the longest allowed": "9" * MAX_NONCE_DIGITS,
}
"""Nonces the seed's "unix time or any random integer value" allows."""


@pytest.mark.parametrize("nonce", SEED_NONCES.values(), ids=SEED_NONCES.keys())
def test_any_decimal_integer_nonce_is_accepted_by_default_when_the_signature_is_right(nonce: str) -> None:
    auth = make_auth()
    assert auth.authenticate(signed_headers(nonce)) == KEY
    assert auth.authenticate(signed_headers(nonce)) == KEY, "and again: the seed reuses its NONCE"


@pytest.mark.parametrize("nonce", SEED_NONCES.values(), ids=SEED_NONCES.keys())
def test_a_wrong_signature_is_refused_whatever_the_nonce(nonce: str) -> None:
    error = refused(make_auth(), signed_headers(nonce, sign(KEY, "not-the-secret", nonce)))
    assert error.message == INVALID_CREDENTIALS
    refused(make_auth(), signed_headers(nonce, sign(KEY, SECRET, nonce + "0")))


@pytest.mark.parametrize("unit", ["seconds", "milliseconds", "auto"])
def test_each_opt_in_unit_refuses_a_random_integer_and_an_hour_old_timestamp(unit: str) -> None:
    auth = make_auth(window=3600, unit=unit)
    old = seconds_nonce(-3601) if unit == "seconds" else ms_nonce(-3601)
    for nonce in ("12345", old):
        assert "outside the freshness window" in refused(auth, signed_headers(nonce)).message
    assert auth.authenticate(signed_headers(seconds_nonce() if unit == "seconds" else ms_nonce())) == KEY


def test_unknown_key_and_wrong_signature_get_the_same_answer() -> None:
    auth = make_auth()
    wrong_signature = refused(auth, signed_headers(seconds_nonce(), "f" * 64))
    unknown_key = refused(auth, signed_headers(seconds_nonce(), key="no-such-key"))
    assert wrong_signature.message == unknown_key.message == INVALID_CREDENTIALS


def test_strict_mode_refuses_an_identical_replayed_request_and_nothing_else() -> None:
    auth = make_auth(replay_protection=True)
    nonce = ms_nonce()
    assert auth.authenticate(signed_headers(nonce)) == KEY
    auth.check_replay(KEY, nonce, "POST", "/v1/Task/Detail", b'{"taskid": "1"}')
    # distinct requests sharing the nonce (the client's parallel calls, the seed's Run -> Detail -> Kill) pass
    auth.check_replay(KEY, nonce, "POST", "/v1/Task/Detail", b'{"taskid": "2"}')
    auth.check_replay(KEY, nonce, "POST", "/v1/Task/Kill", b'{"taskid": "1"}')
    auth.check_replay(OTHER_SIGNED, nonce, "POST", "/v1/Task/Detail", b'{"taskid": "1"}')
    with pytest.raises(ApiError) as caught:
        auth.check_replay(KEY, nonce, "POST", "/v1/Task/Detail", b'{"taskid": "1"}')
    assert caught.value.http_status == 401 and "already received" in caught.value.message


def test_strict_mode_off_by_default_never_refuses_a_repeat() -> None:
    auth = make_auth()
    assert not auth.strict
    for _ in range(3):
        auth.check_replay(KEY, ms_nonce(), "POST", "/v1/Task/Detail", b"{}")


def test_non_integer_nonce_is_refused() -> None:
    auth = make_auth()
    for nonce in ["abc", "12.5", "-1", "1e9", " 1 2", "0x1f"]:
        error = refused(auth, signed_headers(nonce))
        assert "x-nonce must be a decimal integer" in error.message


def test_a_nonce_longer_than_the_bound_is_refused_naming_it() -> None:
    error = refused(make_auth(), signed_headers("7" * (MAX_NONCE_DIGITS + 1)))
    assert error.message == (f"x-nonce must be a decimal integer of at most {MAX_NONCE_DIGITS} digits (unix time or "
                             f"any random integer), got {MAX_NONCE_DIGITS + 1} characters.")


def test_key_only_mode_accepts_just_the_key() -> None:
    auth = make_auth()
    assert auth.authenticate(Headers({"x-api-key": KEY_ONLY})) == KEY_ONLY
    assert auth.authenticate(Headers({"x-api-key": KEY_ONLY})) == KEY_ONLY


def test_signed_key_refuses_unsigned_requests() -> None:
    auth = make_auth()
    error = refused(auth, Headers({"x-api-key": KEY}))
    assert "x-signature" in error.message
    refused(auth, Headers({"x-api-key": KEY, "x-nonce": "1"}))
    refused(auth, Headers({"x-api-key": KEY, "x-signature": sign(KEY, SECRET, "1")}))


def test_open_mode_accepts_unsigned_requests() -> None:
    auth = Authenticator({}, MemoryNonceStore(), 300)
    assert auth.open
    assert auth.authenticate(Headers({})) is None
    assert auth.authenticate(Headers({"x-api-key": "anything"})) is None
    assert not make_auth().open


def test_nonce_store_forgets_nonces_after_the_window() -> None:
    store = MemoryNonceStore()
    assert store.use("k", "1", now=1000.0, window=300)
    assert not store.use("k", "1", now=1299.0, window=300)
    assert store.use("k", "1", now=1301.0, window=300)
    assert store.use("other", "1", now=1301.0, window=300)


def test_nonce_store_memory_is_bounded() -> None:
    store = MemoryNonceStore(max_entries=10)
    for nonce in range(100):
        assert store.use("k", str(nonce), now=1000.0 + nonce / 1000, window=300)
    assert len(store) == 10
    for nonce in range(1000):
        store.use("k", str(nonce), now=5000.0 + nonce, window=1)
    assert len(store) <= 2


def test_new_key_pair_is_fresh_and_loadable() -> None:
    (key, secret), (key2, _) = new_key_pair(), new_key_pair()
    assert key != key2 and len(key) >= 20 and len(secret) >= 32
    loaded = load_api_keys(SimpleNamespace(api_keys=f"{key}:{secret}", api_keys_file=None))
    assert loaded == {key: ApiKey(key, secret)}


def test_load_api_keys_from_settings_string() -> None:
    keys = load_api_keys(SimpleNamespace(api_keys=" a:one, b:two ,c:,", api_keys_file=None))
    assert keys == {"a": ApiKey("a", "one"), "b": ApiKey("b", "two"), "c": ApiKey("c", None)}


def test_load_api_keys_from_file(tmp_path) -> None:
    path = tmp_path / "keys.txt"
    path.write_text("# operators\n\nfile-key:file-secret\n  spaced : secret2  \nplain:\n")
    keys = load_api_keys(SimpleNamespace(api_keys="env:s", api_keys_file=path))
    assert keys == {
        "env": ApiKey("env", "s"),
        "file-key": ApiKey("file-key", "file-secret"),
        "spaced": ApiKey("spaced", "secret2"),
        "plain": ApiKey("plain", None),
    }


def test_load_api_keys_with_nothing_configured_is_open() -> None:
    assert load_api_keys(SimpleNamespace(api_keys=None, api_keys_file=None)) == {}


@pytest.mark.parametrize("entry", ["nocolon", ":secret", "a b:secret", "k:sec ret"])
def test_malformed_key_entry_is_an_error_naming_it(entry: str) -> None:
    with pytest.raises(ValueError, match="Malformed API key entry") as caught:
        load_api_keys(SimpleNamespace(api_keys=f"good:x,{entry}", api_keys_file=None))
    assert "#2" in str(caught.value)


def test_malformed_file_line_is_an_error_naming_the_line(tmp_path) -> None:
    path = tmp_path / "keys.txt"
    path.write_text("# comment\nok:secret\nbroken-line\n")
    with pytest.raises(ValueError, match=r"keys\.txt:3"):
        load_api_keys(SimpleNamespace(api_keys=None, api_keys_file=path))


def test_conflicting_duplicate_key_is_an_error() -> None:
    with pytest.raises(ValueError, match="twice"):
        load_api_keys(SimpleNamespace(api_keys="k:one,k:two", api_keys_file=None))


def test_missing_keys_file_is_an_error(tmp_path) -> None:
    with pytest.raises(ValueError, match="api_keys_file"):
        load_api_keys(SimpleNamespace(api_keys=None, api_keys_file=tmp_path / "absent"))


def test_settings_default_to_any_nonce_a_generous_opt_in_window_and_strict_mode_off() -> None:
    from particalize.settings import Settings

    settings = Settings(api_keys="a:b,c:", api_keys_file=None)
    assert settings.replay_protection is False and settings.nonce_window_seconds == 3600
    assert settings.nonce_unit == "any", "the seed: 'unix time or any random integer value'"
    assert Authenticator.from_settings(settings, MemoryNonceStore()).authenticate(
        Headers({"x-api-key": "a", "x-nonce": "12345", "x-signature": sign("a", "b", "12345")})) == "a"
    assert Settings(replay_protection=True).replay_protection is True
    assert load_api_keys(settings) == {"a": ApiKey("a", "b"), "c": ApiKey("c", None)}
