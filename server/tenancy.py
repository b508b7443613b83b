"""Tenants: which API key a call came with, as an opaque id, and the prefix-cache salt it gives.

ApiKeys names each key by a keyed hash (HMAC-SHA256 under a secret drawn when
the gateway starts, cut to 16 hex digits), never the key itself; the auth interceptor makes it
current for the call's handler (a context variable, inherited by the tasks the handler starts). The engine API
turns the tenant and a request's cache_salt into the salt of its block hashes
(server/block_manager.py): requests share cached blocks only when their salts are equal.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import secrets
from collections.abc import Iterable

from shardgate.server.validation import invalid

TENANT: contextvars.ContextVar[str | None] = contextvars.ContextVar("shardgate_tenant", default=None)
"""The tenant id of the call being handled; None on a server without API keys."""

MAX_CACHE_SALT_CHARS = 256


def current_tenant() -> str | None:
    return TENANT.get()


class ApiKeys:
    """The configured API keys and their tenant ids (stable while the gateway runs, meaningless
    outside it). Build it once and give it to every frontend that checks keys, so that a key is
    the same tenant on each protocol (its quota and its prefix cache)."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = [key.encode() for key in keys]
        if not self._keys:
            raise ValueError("the API key file holds no key")
        secret = secrets.token_bytes(32)
        self._tenants = [hmac.new(secret, key, hashlib.sha256).hexdigest()[:16] for key in self._keys]

    def tenant(self, authorization: str | None) -> str | None:
        """The tenant id of an `authorization: Bearer <key>` value; None unless it holds a configured key."""
        if not isinstance(authorization, str) or not authorization.startswith("Bearer "):
            return None
        offered = authorization[len("Bearer ") :].encode()
        # Compare against every key, always, so the time taken says nothing about which matched.
        matches = [hmac.compare_digest(offered, key) for key in self._keys]
        return self._tenants[matches.index(True)] if any(matches) else None


def cache_salt(tenant: str | None, salt: str, sharing: str) -> bytes:
    """The block-hash salt of a request: its tenant's (unless `sharing` is global) and its own
    cache_salt, hashed together; b"" when there is neither (every such request shares)."""
    if len(salt) > MAX_CACHE_SALT_CHARS:
        raise invalid("cache_salt", f"at most {MAX_CACHE_SALT_CHARS} characters, got {len(salt)}")
    scope = tenant if sharing == "per-key" else None
    if scope is None and not salt:
        return b""
    return hashlib.sha256(f"tenant={scope or ''}\0salt={salt}".encode()).digest()
