"""The benchmark's load generator: streams the workload to a server over a protocol's driver
(protocols.py), closed loop at a concurrency or open loop at a Poisson rate, and times every token."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import time

from tqdm import tqdm

from shardgate.clients.async_client import AsyncClient
from shardgate.clients.errors import ShardgateError
from shardgate.clients.tools.bench_metrics import RequestRecord
from shardgate.clients.tools.pool import closed_loop_map
from shardgate.clients.tools.protocols import StreamDriver
from shardgate.clients.tools.workload import WorkItem


async def timed_request(driver: StreamDriver, item: WorkItem, ignore_eos: bool) -> RequestRecord:
    """One greedy streamed request; token times are when each message arrived."""
    record = RequestRecord(start=time.perf_counter(), prompt_tokens=len(item.prompt_ids))
    try:
        async for count in driver.stream(item, ignore_eos):
            record.token_times.extend([time.perf_counter()] * count)
    except ShardgateError as error:
        record.error = error.code().name
    record.end = time.perf_counter()
    return record


async def run_load(
    driver: StreamDriver,
    items: list[WorkItem],
    *,
    concurrency: int | None = None,
    arrivals: list[float] | None = None,
    ignore_eos: bool = True,
    progress: bool = True,
    label: str = "",
) -> list[RequestRecord]:
    """Closed loop (`concurrency` requests always in flight) or open loop (request i starts at
    `arrivals[i]` seconds, however many are in flight). Records come back in workload order."""
    if (concurrency is None) == (arrivals is None):
        raise ValueError("give either a concurrency (closed loop) or arrival times (open loop)")
    bar = tqdm(
        total=len(items), unit="req", desc=label, disable=None if progress else True, file=sys.stderr, dynamic_ncols=True, leave=False
    )

    async def run(item: WorkItem) -> RequestRecord:
        record = await timed_request(driver, item, ignore_eos)
        bar.update(1)
        return record

    try:
        if concurrency is not None:
            return await closed_loop_map(items, concurrency, run)
        start = time.perf_counter()
        tasks = []
        for item, at in zip(items, arrivals):
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)  # the schedule itself, not a wait for an event
            tasks.append(asyncio.create_task(run(item)))
        return list(await asyncio.gather(*tasks))
    finally:
        bar.close()


async def warm_up(driver: StreamDriver, items: list[WorkItem], count: int) -> None:
    """A few short requests first, so the run does not measure one-time start costs."""
    for item in items[:count]:
        async for _ in driver.stream(dataclasses.replace(item, max_new_tokens=min(item.max_new_tokens, 8)), ignore_eos=True):
            pass


async def run_embed_load(client: AsyncClient, texts: list[str], concurrency: int) -> list[RequestRecord]:
    """Single-input Embed calls, closed loop; a record's latency is its call's."""

    async def call(text: str) -> RequestRecord:
        record = RequestRecord(start=time.perf_counter(), prompt_tokens=0)
        try:
            result = await client.embed(text)
            record.prompt_tokens = result.usage.prompt_tokens
        except ShardgateError as error:
            record.error = error.code().name
        record.end = time.perf_counter()
        return record

    return await closed_loop_map(texts, concurrency, call)
