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
from collections.abc import AsyncIterator, Callable, Sized


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


_WAKE = object()


class Outbox:
    """The messages of a multiplexed call (GenerateBidi, ModelStreamInfer) waiting for its
    transport: the handler's loop takes each with next(), yields it, and calls written()."""

    def __init__(self, stream: OutputStream, stall_timeout_s: float) -> None:
        self.stream = stream
        self.stall_timeout_s = stall_timeout_s
        self._queue: asyncio.Queue = asyncio.Queue()

    def put(self, message: object) -> None:
        """Queues a message of no request (a refusal, a request's final error): it counts as one
        undelivered item of the stream until written."""
        self.stream.made(1)
        self._queue.put_nowait((message, lambda: self.stream.delivered(1)))

    async def send(self, message: object, on_stall: Callable[[], None]) -> None:
        """Queues a request's message and returns once the transport took it; if that takes
        longer than the stall timeout, calls on_stall() and goes on waiting."""
        written = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((message, lambda: written.done() or written.set_result(None)))
        try:
            await asyncio.wait_for(asyncio.shield(written), self.stall_timeout_s)
        except TimeoutError:
            on_stall()
            await written

    def wake(self) -> None:
        """Wakes the handler's loop (a request or the reader ended)."""
        self._queue.put_nowait(_WAKE)

    async def next(self) -> tuple[object, Callable[[], None]] | None:
        """The next message and what to call once the transport took it; None for a wake-up."""
        item = await self._queue.get()
        return None if item is _WAKE else item

    def empty(self) -> bool:
        return self._queue.empty()

    async def messages(self, reader: asyncio.Task, live: Sized) -> AsyncIterator[object]:
        """The call's messages for its handler to yield, each taken once the one before it was
        written (the handler's `yield` resumes once the transport took it), until the call's
        `reader` task is done, no request is `live` and none is queued; then the reader's
        exception, if any, ends the call."""
        reader.add_done_callback(lambda _: self.wake())
        while True:
            item = await self.next()
            if item is not None:
                message, written = item
                yield message
                written()
            elif reader.done() and not live and self.empty():
                reader.result()
                return
