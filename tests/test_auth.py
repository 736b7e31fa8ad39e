"""User tokens (JWTs) without Serve: every refusal is a 401/403 that names its reason and never the token.

The HTTP side (a token on a real request) is in tests/test_serving_app.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from peftu.config import ServeConfig
from peftu.serving.api import ApiError
from peftu.serving.auth import UserTokens, make_token, parse_duration, parse_secrets

MODEL = "tiny-test"
OLD, NEW = "o" * 40, "n" * 40
SECRETS = f"k2:{NEW}, k1:{OLD}"


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key():
    return ec.generate_private_key(ec.SECP256R1())


def _jwk(private, kid: str, alg: str) -> dict:
    algorithm = jwt.algorithms.RSAAlgorithm if alg == "RS256" else jwt.algorithms.ECAlgorithm
    return {**json.loads(algorithm.to_jwk(private.public_key())), "kid": kid, "alg": alg, "use": "sig"}


@pytest.fixture
def tokens(monkeypatch, tmp_path, rsa_key, ec_key) -> UserTokens:
    """HS256 keys k2 (signing) and k1 (rotating out), and an identity provider's RS256 and ES256 keys."""
    monkeypatch.setenv("PEFTU_TOKEN_SECRET", SECRETS)
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [_jwk(rsa_key, "idp-rsa", "RS256"), _jwk(ec_key, "idp-ec", "ES256"),
                                         {"kty": "RSA", "use": "enc", "kid": "enc-only", "n": "AQAB", "e": "AQAB"}]}))
    return UserTokens.from_config(ServeConfig(token_jwks=str(jwks), token_leeway_s=5), MODEL)


def _claims(**extra) -> dict:
    now = int(time.time())
    return {"sub": "alice", "aud": MODEL, "iat": now, "exp": now + 600, **extra}


def _refusal(tokens: UserTokens, token: str, user: str = "alice") -> ApiError:
    with pytest.raises(ApiError) as refused:
        asyncio.run(tokens.authorize(user, f"Bearer {token}"))
    assert not any(part in refused.value.message for part in token.split(".") if part)
    assert OLD not in refused.value.message and NEW not in refused.value.message
    return refused.value


def test_tokens_minted_with_either_rotating_key_name_their_user(tokens):
    for kid, secret in (("k2", NEW), ("k1", OLD)):
        token = make_token(secret, "alice", MODEL, ttl_s=60, kid=kid)
        asyncio.run(tokens.authorize("alice", f"Bearer {token}"))
        assert asyncio.run(tokens.token_user(f"bearer {token}")) == "alice"


def test_an_identity_providers_rs256_and_es256_tokens_verify_through_the_jwks_file(tokens, rsa_key, ec_key):
    for key, kid, alg in ((rsa_key, "idp-rsa", "RS256"), (ec_key, "idp-ec", "ES256")):
        token = jwt.encode(_claims(), key, algorithm=alg, headers={"kid": kid})
        assert asyncio.run(tokens.token_user(f"Bearer {token}")) == "alice"
    assert "enc-only" not in tokens.keys


@pytest.mark.parametrize("case, status, reason", [
    ("expired", 401, "has expired"),
    ("not yet valid", 401, "not valid yet"),
    ("issued in the future", 401, "not valid yet"),
    ("wrong audience", 401, f"not for this model (its aud must be '{MODEL}')"),
    ("no exp", 401, "no 'exp' claim"),
    ("unknown kid", 401, "key id (kid) is not one of this server's keys"),
    ("no kid", 401, "no key id (kid)"),
    ("forged signature", 401, "signature does not verify"),
    ("alg none", 401, "algorithm is not accepted"),
    ("HS256 signed with the RSA public key", 401, "algorithm is not the one of its key"),
    ("another user's token", 403, "not valid for user 'alice'"),
    ("sub not a valid user id", 401, "subject (sub) is not a valid user id"),
    ("sub not a string", 401, "subject (sub) is not a valid user id"),
    ("not a JWT", 401, "not a JWT"),
])
def test_each_bad_token_is_refused_naming_the_reason(tokens, rsa_key, case, status, reason):
    now = int(time.time())
    sign = lambda claims, kid="k2", secret=NEW: jwt.encode(claims, secret, algorithm="HS256",  # noqa: E731
                                                           headers={"kid": kid})
    pem = rsa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    token = {
        "expired": sign(_claims(iat=now - 900, exp=now - 60)),
        "not yet valid": sign(_claims(nbf=now + 300)),
        "issued in the future": sign(_claims(iat=now + 300)),
        "wrong audience": sign(_claims(aud="another-model")),
        "no exp": sign({k: v for k, v in _claims().items() if k != "exp"}),
        "unknown kid": sign(_claims(), kid="k0"),
        "no kid": jwt.encode(_claims(), NEW, algorithm="HS256"),
        "forged signature": sign(_claims(), secret="f" * 40),
        "alg none": jwt.encode(_claims(), None, algorithm="none", headers={"kid": "k2"}),
        # the classic confusion: the RSA key's public PEM used as an HMAC secret
        "HS256 signed with the RSA public key": _hs256_raw(_claims(), pem, "idp-rsa"),
        "another user's token": sign(_claims(sub="bob")),
        "sub not a valid user id": sign(_claims(sub="../alice")),
        "sub not a string": sign(_claims(sub=42)),
        "not a JWT": "peftu1.YWxpY2U.AAAA",
    }[case]
    refused = _refusal(tokens, token)
    assert refused.status == status and reason in refused.message, refused.message
    assert asyncio.run(tokens.token_user(f"Bearer {token}")) in (None, "bob")


def _hs256_raw(claims: dict, secret: bytes, kid: str) -> str:
    """An HS256 JWT over any bytes (PyJWT itself refuses PEM-looking HMAC secrets)."""
    import base64
    import hashlib
    import hmac

    b64 = lambda data: base64.urlsafe_b64encode(data).rstrip(b"=").decode()  # noqa: E731
    signing = f"{b64(json.dumps({'alg': 'HS256', 'kid': kid}).encode())}.{b64(json.dumps(claims).encode())}"
    return f"{signing}.{b64(hmac.new(secret, signing.encode(), hashlib.sha256).digest())}"


def test_a_missing_or_non_bearer_header_is_a_401(tokens):
    for header in (None, "", "Basic YWxpY2U6eA==", "Bearer "):
        with pytest.raises(ApiError) as refused:
            asyncio.run(tokens.authorize("alice", header))
        assert refused.value.status == 401 and "Authorization: Bearer" in refused.value.message
        assert asyncio.run(tokens.token_user(header)) is None


def test_a_key_rotated_out_is_refused_as_unknown(monkeypatch):
    old_token = make_token(OLD, "alice", MODEL, kid="k1")
    monkeypatch.setenv("PEFTU_TOKEN_SECRET", f"k2:{NEW}")
    only_new = UserTokens.from_config(ServeConfig(), MODEL)
    assert "not one of this server's keys" in _refusal(only_new, old_token).message
    asyncio.run(only_new.authorize("alice", f"Bearer {make_token(NEW, 'alice', MODEL, kid='k2')}"))


def test_the_issuer_is_checked_when_configured(monkeypatch):
    monkeypatch.setenv("PEFTU_TOKEN_SECRET", NEW)
    tokens = UserTokens.from_config(ServeConfig(token_issuer="https://idp.example"), MODEL)
    refused = _refusal(tokens, make_token(NEW, "alice", MODEL, iss="https://other.example"))
    assert "expected issuer" in refused.message
    asyncio.run(tokens.authorize("alice", f"Bearer {make_token(NEW, 'alice', MODEL, iss='https://idp.example')}"))


def test_keys_are_fetched_from_a_jwks_url(monkeypatch, rsa_key, ec_key, free_tcp_port):
    """An identity provider's JWKS endpoint on loopback; a kid it does not list, or no endpoint, is refused."""
    class Jwks(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            body = json.dumps({"keys": [_jwk(rsa_key, "idp-rsa", "RS256")]}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Jwks)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.delenv("PEFTU_TOKEN_SECRET", raising=False)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/jwks.json"
        tokens = UserTokens.from_config(ServeConfig(token_jwks=url), MODEL)
        rs = jwt.encode(_claims(), rsa_key, algorithm="RS256", headers={"kid": "idp-rsa"})
        assert asyncio.run(tokens.token_user(f"Bearer {rs}")) == "alice"
        es = jwt.encode(_claims(), ec_key, algorithm="ES256", headers={"kid": "idp-ec"})
        assert "not one of this server's keys" in _refusal(tokens, es).message
    finally:
        server.shutdown()
    gone = UserTokens.from_config(ServeConfig(token_jwks=f"http://127.0.0.1:{free_tcp_port}/jwks.json"), MODEL)
    refused = _refusal(gone, rs)
    assert refused.status == 503 and "cannot be fetched" in refused.message


def test_bad_key_settings_stop_the_replica_with_a_message(monkeypatch, tmp_path):
    monkeypatch.delenv("PEFTU_TOKEN_SECRET", raising=False)
    with pytest.raises(ValueError, match="user_tokens is on but neither"):
        UserTokens.from_config(ServeConfig(), MODEL)
    assert UserTokens.from_config(ServeConfig(user_tokens=False), MODEL) is None
    for value, problem in (("short", "shorter than 32 bytes"), (f"k1:{OLD},k1:{NEW}", "appears twice"),
                           (f"k1:{OLD},{NEW}", "entry 2 is not KID:SECRET")):
        with pytest.raises(ValueError, match=problem) as bad:
            parse_secrets(value)
        assert OLD not in str(bad.value) and NEW not in str(bad.value)
    (tmp_path / "empty.json").write_text('{"keys": []}')
    with pytest.raises(ValueError, match="no signing key"):
        UserTokens.from_config(ServeConfig(token_jwks=str(tmp_path / "empty.json")), MODEL)
    with pytest.raises(ValueError, match="cannot be read as JSON"):
        UserTokens.from_config(ServeConfig(token_jwks=str(tmp_path / "missing.json")), MODEL)


def test_durations_and_minting():
    assert [parse_duration(t) for t in ("90", "90s", "15m", "1h", "7d")] == [90, 90, 900, 3600, 7 * 86400]
    for bad in ("", "0", "1w", "-5m", "h"):
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(bad)
    with pytest.raises(ValueError, match="32 bytes"):
        make_token("short", "alice", MODEL)
    claims = jwt.decode(make_token(NEW, "alice", MODEL, ttl_s=120, kid="k2"), NEW, algorithms=["HS256"],
                        audience=MODEL)
    assert claims["sub"] == "alice" and claims["exp"] - claims["iat"] == 120
