"""Specification of Wiro-style request authentication (x-api-key, x-nonce, x-signature)."""

from __future__ import annotations

import shutil
import subprocess
import time
from types import SimpleNamespace

import pytest
from starlette.datastructures import Headers

from server.auth import ApiKey, Authenticator, MemoryNonceStore, load_api_keys, new_key_pair, sign
from server.errors import ApiError

KEY, SECRET = "test-key", "test-secret"
KEY_ONLY = "plain-key"


def make_auth(replay_protection: bool = True, window: float = 300) -> Authenticator:
    keys = {KEY: ApiKey(KEY, SECRET), KEY_ONLY: ApiKey(KEY_ONLY, None)}
    return Authenticator(keys, MemoryNonceStore(), window, replay_protection=replay_protection)


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
    nonce = str(int(time.time()))
    line = openssl_line(nonce)
    assert "=" in line  # "SHA2-256(stdin)= <hex>" or "(stdin)= <hex>", exactly as the seed sends it
    assert make_auth().authenticate(signed_headers(nonce, line)) == KEY


def test_signature_is_case_insensitive_hex() -> None:
    nonce = "1734513809"
    assert make_auth().authenticate(signed_headers(nonce, sign(KEY, SECRET, nonce).upper())) == KEY


def test_fresh_millisecond_nonces_are_accepted_like_the_official_client_sends() -> None:
    auth = make_auth()
    first = str(int(time.time() * 1000))
    second = str(int(first) + 1)
    assert auth.authenticate(signed_headers(first)) == KEY
    assert auth.authenticate(signed_headers(second)) == KEY


def test_wrong_signature_is_refused() -> None:
    error = refused(make_auth(), signed_headers("1734513809", "0" * 64))
    assert "x-signature" in error.message


def test_signature_for_another_nonce_is_refused() -> None:
    refused(make_auth(), signed_headers("1734513809", sign(KEY, SECRET, "1734513808")))


def test_unknown_key_is_refused() -> None:
    error = refused(make_auth(), signed_headers("1", key="nobody"))
    assert "Unknown API key" in error.message


def test_missing_key_is_refused() -> None:
    error = refused(make_auth(), Headers({}))
    assert "x-api-key" in error.message


def test_replayed_nonce_is_refused() -> None:
    auth = make_auth()
    headers = signed_headers("1734513809")
    assert auth.authenticate(headers) == KEY
    error = refused(auth, headers)
    assert "nonce already used" in error.message


def test_refused_signature_does_not_burn_the_nonce() -> None:
    auth = make_auth()
    refused(auth, signed_headers("42", "f" * 64))
    assert auth.authenticate(signed_headers("42")) == KEY


def test_replay_protection_off_accepts_a_reused_nonce_as_the_seed_shell_does() -> None:
    auth = make_auth(replay_protection=False)
    headers = signed_headers("1734513809")
    for _ in range(3):
        assert auth.authenticate(headers) == KEY


def test_non_integer_nonce_is_refused() -> None:
    auth = make_auth()
    for nonce in ["abc", "12.5", "-1", "1e9", "1" * 33]:
        error = refused(auth, signed_headers(nonce))
        assert "x-nonce" in error.message


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


def test_settings_expose_replay_protection_on_by_default() -> None:
    from particalize.settings import Settings

    settings = Settings(api_keys="a:b,c:", api_keys_file=None)
    assert settings.replay_protection is True
    assert Settings(replay_protection=False).replay_protection is False
    assert load_api_keys(settings) == {"a": ApiKey("a", "b"), "c": ApiKey("c", None)}
