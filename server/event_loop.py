"""The event loop the gateway and the benchmark's load run on: uvloop where it is installed
(the gateway extra installs it on Linux and macOS), else asyncio's own.

Measured on the bench model at 32 streams (README, Performance): uvloop took the gateway's CPU
for the same tokens down by 6–20% and a bare gRPC stream's by about a tenth a message. On a host
whose cores the model step fills, what the gateway spends is taken from the step."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import TypeVar

try:
    import uvloop
except ImportError:  # a platform uvloop does not build for (Windows)
    uvloop = None

T = TypeVar("T")


def name() -> str:
    """Which loop run() uses, for the start log."""
    return "uvloop" if uvloop is not None else "asyncio"


def run(main: Coroutine[object, object, T]) -> T:
    """asyncio.run(main) on the loop this module picks."""
    return asyncio.run(main) if uvloop is None else uvloop.run(main)
