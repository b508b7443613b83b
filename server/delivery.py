"""Backpressure: output a stream's requests made that its transport has not yet written.

A frontend opens one OutputStream per call that carries output (a GenerateStream call, a whole
GenerateBidi or ModelStreamInfer call) and hands it to the engine API with each request on it.
The engine counts each token it hands a request as made; the request's Generation counts its
tokens delivered once the frontend pulls the next output, which a frontend does only after the
transport took the previous one (a streaming handler's `yield` resumes, or an awaited write
returns, once gRPC has handed the message to HTTP/2 flow control). While a stream is at its
bound, the engine gives its requests no steps (they keep their KV blocks, and end
DEADLINE_EXCEEDED past the stall timeout), and a multiplexed stream reads no new request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class OutputStream:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        """Undelivered items at which the stream is over its bound."""
        self.undelivered = 0
        """Tokens (and error messages) made for the stream and not yet written."""
        self._room = asyncio.Event()
        self._room.set()
        self._on_room: set[Callable[[], None]] = set()

    @property
    def over(self) -> bool:
        return self.undelivered >= self.limit

    def made(self, count: int) -> None:
        self.undelivered += count
        if self.over:
            self._room.clear()

    def delivered(self, count: int) -> None:
        was_over = self.over
        self.undelivered -= count
        if was_over and not self.over:
            self._room.set()
            callbacks, self._on_room = self._on_room, set()
            for callback in callbacks:
                callback()

    def call_on_room(self, callback: Callable[[], None]) -> None:
        """Calls callback (once) when the stream next drops below its bound (an engine's wakeup)."""
        self._on_room.add(callback)

    async def room(self) -> None:
        """Returns once the stream is below its bound."""
        await self._room.wait()
