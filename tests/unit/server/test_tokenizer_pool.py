"""The tokenizer pool: work runs off the event loop, and callers past the bound are refused at once."""

import asyncio
import threading
import time

import grpc
import pytest

from shardgate.server.config import TokenizerPoolConfig
from shardgate.server.tokenizer_pool import TokenizerPool
from shardgate.server.validation import RequestError, invalid


def test_work_runs_on_a_pool_thread_while_the_loop_runs_on():
    pool = TokenizerPool(TokenizerPoolConfig(threads=1))
    ticks = []

    async def ticker():
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.01)

    async def main():
        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        thread = await pool.run(lambda: (time.sleep(0.3), threading.current_thread().name)[1])
        task.cancel()
        return thread

    try:
        assert asyncio.run(main()).startswith("tokenizer")
    finally:
        pool.close()
    assert len(ticks) >= 10 and max(b - a for a, b in zip(ticks, ticks[1:])) < 0.2


def test_errors_reach_the_caller_and_callers_past_the_bound_are_refused():
    pool = TokenizerPool(TokenizerPoolConfig(threads=1, max_pending=2))
    release = threading.Event()

    def bad():
        raise invalid("prompt", "bad")

    async def main():
        with pytest.raises(RequestError, match="^prompt: bad$"):
            await pool.run(bad)
        waiting = [asyncio.create_task(pool.run(release.wait)) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(RequestError) as raised:
            await pool.run(lambda: None)
        release.set()
        assert await asyncio.gather(*waiting) == [True, True] and pool.pending == 0
        return raised.value

    try:
        error = asyncio.run(main())
    finally:
        pool.close()
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.field == "max_tokenizing_requests"
    assert "--max-tokenizing-requests 2" in str(error)
