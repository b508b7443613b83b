"""The gRPC core settings of the `shardgate` command's processes (the gateway, its shards, the
bench's load, every client command), set in the environment before grpc loads: gRPC reads them
once, as it loads. A setting the user's environment already has is left as it is.

- `GRPC_EXPERIMENTS=-event_engine_client`: channels use gRPC's iomgr TCP client instead of the
  EventEngine client, so a connection's reads run in the thread that polls its completion queue
  (grpc.aio's poller) rather than on an EventEngine thread that then hands each one over. Measured
  on this project's 2-core host (README, Performance, "gRPC's iomgr client"): a bare grpc.aio
  stream's client 31–35 against 41–50 µs of CPU a message; at 32 streams the gateway 121–125
  against 139–160 µs a token (its channels to the shards) and the bench's client about a quarter
  less.

Importing this module applies them (cli.py imports it before anything that loads grpc). The
client library (`shardgate.clients`) sets nothing: a program that imports it keeps its own gRPC
configuration."""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

SETTINGS = {"GRPC_EXPERIMENTS": "-event_engine_client"}


def configure(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Puts each setting the environment lacks into it. Does nothing, and returns False, once grpc
    has loaded (in a process that imported it first): gRPC would ignore them then."""
    if "grpc" in sys.modules:
        return False
    for name, value in SETTINGS.items():
        environ.setdefault(name, value)
    return True


APPLIED = configure()
"""Whether this process's gRPC runs with SETTINGS (as far as the environment did not set them)."""
