"""How the gateway proves itself to a replica's driver and names its session (shard.proto's
Shard service): the metadata both ends agree on.

A leaf: the standard library only.
"""

from __future__ import annotations

from shardgate.proto.secret_files import read_secret_lines

TOKEN_HEADER = "authorization"
"""Carries `Bearer <token>`, the shared secret of a driver's --listen-token-file."""
SESSION_HEADER = "shardgate-session"
"""Carries the id Attach gave the gateway's session, on every other call."""
MIN_TOKEN_CHARS = 16
"""Shortest token accepted: a guessable one would be no lock (make one with `openssl rand -hex 32`)."""


def read_token(path: str, flag: str) -> str:
    """The token a file holds (one line); raises ValueError naming the flag and the file when it
    cannot be read, is empty, holds several lines or a token too short to be a secret."""
    lines = read_secret_lines(path, flag)
    if len(lines) != 1:
        raise ValueError(f"{flag} {path}: holds {len(lines)} lines, expected one token")
    if len(lines[0]) < MIN_TOKEN_CHARS:
        raise ValueError(f"{flag} {path}: the token is shorter than {MIN_TOKEN_CHARS} characters (make one with `openssl rand -hex 32`)")
    return lines[0]


def link_metadata(token: str | None, session: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata of a call on the link: the token when there is one, the session once attached."""
    metadata = []
    if token is not None:
        metadata.append((TOKEN_HEADER, f"Bearer {token}"))
    if session is not None:
        metadata.append((SESSION_HEADER, session))
    return tuple(metadata)
