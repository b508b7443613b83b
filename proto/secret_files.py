"""Files that hold secrets (API keys, the driver link's token) and where secrets travel in the
clear: read with one plain error line, and warnings an operator can act on.

A leaf: the standard library only, nothing of the server, the shards or the clients.
"""

from __future__ import annotations

import ipaddress
import os
import stat


def read_secret_lines(path: str, flag: str) -> list[str]:
    """The non-blank lines of a secret file, stripped; raises ValueError naming the flag and the
    file when it is missing, unreadable, not UTF-8 text, or holds none."""
    try:
        with open(path, "rb") as file:
            text = file.read().decode()
    except OSError as error:
        raise ValueError(f"{flag} {path}: cannot read it ({error.strerror or error})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{flag} {path}: not UTF-8 text") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{flag} {path}: the file is empty (one secret per line expected)")
    return lines


def readable_by_others(path: str, flag: str) -> str | None:
    """A warning when the file's mode lets its group or other users read it, else None.

    A warning, not an error: a Kubernetes Secret is mounted group-readable (fsGroup) or
    world-readable (mode 0644, the default) inside a container that only this service runs in,
    and refusing those would refuse the ordinary deployment."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    readers = [who for who, bit in (("group", stat.S_IRGRP), ("others", stat.S_IROTH)) if mode & bit]
    if not readers:
        return None
    return f"{flag} {path} is readable by {' and '.join(readers)} (mode {mode:04o}); make it readable by its owner only (chmod 600)"


def is_loopback(host: str) -> bool:
    """Whether a host (name or address, [bracketed] IPv6 too) stays on this machine."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_of(address: str) -> str:
    """The host part of a `host:port` gRPC address (`[v6]:port` too)."""
    return address.rsplit(":", 1)[0] if ":" in address else address
