"""The outputs of a call's generations (one per choice), interleaved into one stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

from shardgate.server.engine_api import GenerateOutput, Generation
from shardgate.server.validation import RequestError

_ENDED = object()


async def interleaved(generations: list[Generation]) -> AsyncIterator[tuple[int, GenerateOutput]]:
    """(choice index, output) as each generation's outputs come. A generation that fails raises
    its RequestError here; however the iteration ends (finished, failed, closed because the
    client went away), every generation still running is aborted and its KV freed."""
    if len(generations) == 1:  # the common case, without tasks
        async with aclosing(generations[0].outputs()) as outputs:
            async for output in outputs:
                yield 0, output
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def relay(index: int, generation: Generation) -> None:
        try:
            async with aclosing(generation.outputs()) as outputs:
                async for output in outputs:
                    queue.put_nowait((index, output))
        except RequestError as error:
            queue.put_nowait((index, error))
        finally:
            queue.put_nowait((index, _ENDED))

    relays = [asyncio.create_task(relay(i, g), name=f"choice {i} of {g.request_id}") for i, g in enumerate(generations)]
    try:
        running = len(relays)
        while running:
            index, item = await queue.get()
            if item is _ENDED:
                running -= 1
            elif isinstance(item, RequestError):
                raise item
            else:
                yield index, item
    finally:
        for task in relays:
            task.cancel()
        for generation in generations:  # also those whose relay never started
            generation.abort()
