"""The closed loop of the bench, the batch job and the in-process harness: a fixed number of
workers, each taking the next item as soon as its last one is done."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


async def closed_loop(items: Iterable[Item], concurrency: int, work: Callable[[Item], Awaitable[object]]) -> None:
    """Awaits `work(item)` for every item, `concurrency` at a time: `concurrency` workers pull
    from one shared iterator, so each item is taken once, in order, and `items` may be lazy
    (nothing is kept per item). Cancelling the caller cancels every worker. `work` should catch
    its own errors: the first one propagates, and the other workers are left running, as
    asyncio.gather leaves them."""
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    pending = iter(items)

    async def worker() -> None:
        for item in pending:
            await work(item)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def closed_loop_map(items: Sequence[Item], concurrency: int, work: Callable[[Item], Awaitable[Result]]) -> list[Result]:
    """closed_loop over `items`, returning the results of `work` in the items' order."""
    results: list = [None] * len(items)

    async def run(index: int) -> None:
        results[index] = await work(items[index])

    await closed_loop(range(len(items)), concurrency, run)
    return results
