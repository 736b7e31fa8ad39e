"""Per-user tokens (JWTs) and the admin key.

A user token is a JWT (PyJWT): `sub` the user id, `aud` the served model name,
`exp` required, and a `kid` in its header naming the key it was signed with.
HS256 keys come from a server secret (`$PEFTU_TOKEN_SECRET`, several at once
while one rotates out); RS256 / ES256 public keys from a JWKS file or URL, for
tokens an identity provider mints. Each key accepts only its own algorithm, so
`alg: none` or an HS256 token "signed" with a public key is refused. Refusals
name the reason (expired, wrong audience, unknown key, ...) and never echo the
token or anything read from it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import jwt

from peftu.config import ServeConfig
from peftu.errors import InvalidIdError
from peftu.serving.api import ApiError
from peftu.store import validate_id

log = logging.getLogger("peftu.serving")

ALGORITHMS = ("HS256", "RS256", "ES256")
"""The signing algorithms a key may have; anything else (`none` above all) is refused."""
MIN_SECRET_BYTES = 32
"""HS256 secrets shorter than the hash (RFC 7518 §3.2) are refused."""
_KID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Key:
    """One verification key and the one algorithm it accepts."""

    key: object
    """The HS256 secret (bytes) or a public key object."""
    alg: str


def parse_secrets(value: str, where: str = "the token secret") -> dict[str, bytes]:
    """HS256 keys by kid from `KID:SECRET` entries (comma or space separated), or one bare secret.

    The first entry is the signing key. Secrets are never put in an error message.
    """
    entries = [e for e in re.split(r"[,\s]+", value.strip()) if e]
    if len(entries) == 1 and ":" not in entries[0]:
        entries = [f"default:{entries[0]}"]
    keys: dict[str, bytes] = {}
    for i, entry in enumerate(entries):
        kid, sep, secret = entry.partition(":")
        if not sep or not _KID.fullmatch(kid):
            raise ValueError(f"{where}: entry {i + 1} is not KID:SECRET (a kid is 1-64 of A-Z a-z 0-9 . _ -)")
        if kid in keys:
            raise ValueError(f"{where}: kid {kid!r} appears twice")
        if len(secret.encode()) < MIN_SECRET_BYTES:
            raise ValueError(f"{where}: the secret of kid {kid!r} is shorter than {MIN_SECRET_BYTES} bytes")
        keys[kid] = secret.encode()
    if not keys:
        raise ValueError(f"{where} is empty")
    return keys


def jwks_keys(data: dict, where: str) -> dict[str, Key]:
    """The signing keys of a JWKS document by kid (keys for encryption or other algorithms are skipped)."""
    keys: dict[str, Key] = {}
    for i, entry in enumerate(data.get("keys") or []):
        if entry.get("use", "sig") != "sig":
            continue
        try:
            jwk = jwt.PyJWK(entry)
        except jwt.PyJWKError as e:
            log.warning("%s: key %d skipped: %s", where, i + 1, e)
            continue
        if jwk.algorithm_name not in ALGORITHMS or not jwk.key_id:
            log.warning("%s: key %d skipped: it needs a kid and one of %s", where, i + 1, ", ".join(ALGORITHMS))
            continue
        keys[jwk.key_id] = Key(jwk.key, jwk.algorithm_name)
    if not keys:
        raise ValueError(f"{where} has no signing key with a kid and one of {', '.join(ALGORITHMS)}")
    return keys


def parse_duration(text: str) -> float:
    """Seconds of `90`, `90s`, `15m`, `1h`, `7d`."""
    match = _DURATION.fullmatch(text.strip())
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a duration like 3600, 90s, 15m, 1h or 7d")
    return float(match.group(1)) * _UNITS[match.group(2)]


def make_token(secret: str | bytes, user: str, audience: str, *, ttl_s: float = 3600, kid: str = "default",
               now: float | None = None, **claims) -> str:
    """An HS256 JWT that lets its bearer use `user`'s adapter on the model `audience` for `ttl_s`."""
    secret = secret.encode() if isinstance(secret, str) else secret
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"a token secret needs at least {MIN_SECRET_BYTES} bytes")
    issued = int(now if now is not None else time.time())
    payload = {"sub": validate_id(user), "aud": audience, "iat": issued, "exp": issued + int(ttl_s),
               "jti": uuid.uuid4().hex, **claims}
    return jwt.encode(payload, secret, algorithm="HS256", headers={"kid": kid})


def _refused(why: str, status: int = 401) -> ApiError:
    if status == 401:
        return ApiError(status, why, kind="authentication_error")
    return ApiError(status, why, "model", "permission_error")


class UserTokens:
    """The keys a replica accepts user tokens under, and the one check every request goes through."""

    def __init__(self, keys: dict[str, Key], audience: str, *, issuer: str = "", leeway_s: float = 30.0,
                 jwks_url: str = ""):
        self.keys, self.audience, self.issuer, self.leeway_s = dict(keys), audience, issuer, leeway_s
        self._client = jwt.PyJWKClient(jwks_url, cache_jwk_set=True, lifespan=300, timeout=10) if jwks_url else None

    @classmethod
    def from_config(cls, cfg: ServeConfig, audience: str) -> UserTokens | None:
        """The keys `cfg` names (None if it names none); raises ValueError for a bad secret or JWKS."""
        keys: dict[str, Key] = {}
        secret = cfg.secret("token")
        if secret:
            keys.update({kid: Key(s, "HS256") for kid, s in
                         parse_secrets(secret, f"${cfg.token_secret_env}").items()})
        url = cfg.token_jwks if cfg.token_jwks.startswith(("http://", "https://")) else ""
        if cfg.token_jwks and not url:
            path = Path(cfg.token_jwks)
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise ValueError(f"token_jwks {str(path)!r} cannot be read as JSON: {e}") from None
            for kid, key in jwks_keys(data, f"token_jwks {str(path)!r}").items():
                if kid in keys:
                    raise ValueError(f"kid {kid!r} is both in ${cfg.token_secret_env} and in token_jwks")
                keys[kid] = key
        if not keys and not url:
            if cfg.user_tokens:
                raise ValueError(f"user_tokens is on but neither ${cfg.token_secret_env} nor token_jwks gives "
                                 "a key (set one, or user_tokens: false to let anyone use any user's adapter)")
            return None
        return cls(keys, audience, issuer=cfg.token_issuer, leeway_s=cfg.token_leeway_s, jwks_url=url)

    def _key(self, kid: str) -> Key | None:
        key = self.keys.get(kid)
        if key is None and self._client is not None:
            try:
                jwk = self._client.get_signing_key(kid)
            except jwt.PyJWKClientConnectionError as e:
                log.warning("cannot fetch the token JWKS: %s", e)
                raise ApiError(503, "the token keys cannot be fetched right now", kind="server_error") from None
            except (jwt.PyJWKClientError, jwt.PyJWKError):  # the set has no such kid, even fetched afresh
                return None
            if jwk.algorithm_name in ALGORITHMS:
                key = Key(jwk.key, jwk.algorithm_name)
        return key

    def user(self, token: str) -> str:
        """The user id a valid token names; raises a 401 ApiError saying what is wrong with it."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise _refused("the user token is not a JWT") from None
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in ALGORITHMS:
            raise _refused(f"the user token's algorithm is not accepted (only {', '.join(ALGORITHMS)})")
        if not isinstance(kid, str) or not kid:
            raise _refused("the user token has no key id (kid) in its header")
        key = self._key(kid)
        if key is None:
            raise _refused("the user token's key id (kid) is not one of this server's keys")
        if key.alg != alg:
            raise _refused("the user token's algorithm is not the one of its key")
        try:
            claims = jwt.decode(token, key.key, algorithms=[key.alg], audience=self.audience,
                                issuer=self.issuer or None, leeway=self.leeway_s,
                                options={"require": ["exp", "sub", "aud"]})
        except jwt.InvalidTokenError as e:
            raise _refused(self._why(e)) from None
        try:
            return validate_id(claims["sub"])
        except InvalidIdError:
            raise _refused("the user token's subject (sub) is not a valid user id") from None

    def _why(self, error: jwt.InvalidTokenError) -> str:
        if isinstance(error, jwt.ExpiredSignatureError):
            return "the user token has expired"
        if isinstance(error, jwt.ImmatureSignatureError):
            return "the user token is not valid yet (nbf or iat in the future)"
        if isinstance(error, jwt.InvalidAudienceError):
            return f"the user token is not for this model (its aud must be {self.audience!r})"
        if isinstance(error, jwt.InvalidIssuerError):
            return f"the user token is not from the expected issuer ({self.issuer!r})"
        if isinstance(error, jwt.MissingRequiredClaimError):
            return f"the user token has no {error.claim!r} claim"
        if isinstance(error, jwt.InvalidSignatureError):
            return "the user token's signature does not verify"
        if isinstance(error, jwt.exceptions.InvalidSubjectError):
            return "the user token's subject (sub) is not a valid user id"
        return "the user token is malformed"

    async def authorize(self, user: str, authorization: str | None) -> None:
        """Pass if the bearer token names `user`; else a 401 (no or bad token) or 403 (another user's)."""
        await self._off_loop(self._authorize, user, authorization)

    async def token_user(self, authorization: str | None) -> str | None:
        """The user of a valid bearer token, else None (for listings that never refuse)."""
        return await self._off_loop(self._token_user, authorization)

    async def _off_loop(self, check, *args):
        """Checks that may fetch the JWKS URL run in a thread; the others right here (microseconds)."""
        return await asyncio.to_thread(check, *args) if self._client is not None else check(*args)

    def _authorize(self, user: str, authorization: str | None) -> None:
        token = bearer(authorization)
        if token is None:
            raise _refused("this server needs a user token: Authorization: Bearer <token>")
        if self.user(token) != user:
            raise _refused(f"the token is not valid for user {user!r}", 403)

    def _token_user(self, authorization: str | None) -> str | None:
        token = bearer(authorization)
        if token is None:
            return None
        try:
            return self.user(token)
        except ApiError:
            return None


def bearer(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def same_secret(given: str | None, expected: str) -> bool:
    """Constant-time comparison of an API key."""
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())
