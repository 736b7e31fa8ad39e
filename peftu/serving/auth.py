"""Per-user tokens and the admin key.

A user token is `peftu1.<user id, base64url>.<HMAC-SHA256 of it, base64url>`
under a server secret: it names one user and cannot be forged or moved to
another user without the secret. Tokens are compared in constant time and
never logged or echoed in an error.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

_PREFIX = "peftu1"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: str, user: str) -> bytes:
    return hmac.new(secret.encode(), f"{_PREFIX}:{user}".encode(), hashlib.sha256).digest()


def make_token(secret: str, user: str) -> str:
    """A token that lets its bearer use `user`'s adapter."""
    if not secret:
        raise ValueError("a token secret is needed to make tokens")
    return f"{_PREFIX}.{_b64(user.encode())}.{_b64(_mac(secret, user))}"


def token_user(secret: str, token: str) -> str | None:
    """The user a token names, or None if it is malformed or not signed with `secret`."""
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != _PREFIX:
        return None
    try:
        user = _unb64(parts[1]).decode("utf-8")
        mac = _unb64(parts[2])
    except (binascii.Error, ValueError):
        return None
    return user if hmac.compare_digest(mac, _mac(secret, user)) else None


def bearer(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def same_secret(given: str | None, expected: str) -> bool:
    """Constant-time comparison of an API key."""
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())
