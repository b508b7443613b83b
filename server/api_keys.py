"""The API keys of --api-key-file, checked the same way for every protocol (gRPC metadata and
HTTP headers both carry `authorization: Bearer <key>`)."""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from pathlib import Path

BEARER = "Bearer "


class ApiKeys:
    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = [key.encode() for key in keys]
        if not self._keys:
            raise ValueError("the API key file holds no key")

    @classmethod
    def from_file(cls, path: str) -> ApiKeys:
        """One key per line; blank lines and surrounding spaces do not count."""
        return cls(line.strip() for line in Path(path).read_bytes().decode().splitlines() if line.strip())

    def authorized(self, authorization: str | None) -> bool:
        """Whether an `authorization` value is `Bearer <one of the keys>`."""
        if not isinstance(authorization, str) or not authorization.startswith(BEARER):
            return False
        offered = authorization[len(BEARER) :].encode()
        # Compare against every key, always, so the time taken says nothing about which matched.
        return sum(hmac.compare_digest(offered, key) for key in self._keys) > 0
