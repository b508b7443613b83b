"""The tools' closed loop: bounded concurrency, each item once, lazy input, results in order,
cancellation."""

import asyncio

import pytest

from shardgate.clients.tools.pool import closed_loop, closed_loop_map


def test_workers_keep_exactly_concurrency_items_in_flight():
    in_flight, peaks, started = 0, [], []

    async def work(item):
        nonlocal in_flight
        in_flight += 1
        started.append(item)
        peaks.append(in_flight)
        await asyncio.sleep(0.001 * (item % 3))
        in_flight -= 1

    asyncio.run(closed_loop(range(20), 4, work))
    assert started == list(range(20))  # each item once, in order
    assert max(peaks) == 4 and peaks[:4] == [1, 2, 3, 4] and all(peak == 4 for peak in peaks[4:17])


def test_a_lazy_input_is_read_only_as_workers_free_up():
    pulled, done = [], []

    def items():
        for item in range(6):
            pulled.append((item, len(done)))  # what had finished when the item was taken
            yield item

    async def work(item):
        await asyncio.sleep(0)
        done.append(item)

    asyncio.run(closed_loop(items(), 2, work))
    assert sorted(done) == list(range(6))
    assert [finished for _, finished in pulled] == [0, 0, 1, 2, 3, 4]


def test_map_returns_results_in_the_items_order():
    async def work(item):
        await asyncio.sleep(0.002 * (5 - item))  # the later items finish first
        return item * 10

    assert asyncio.run(closed_loop_map(list(range(6)), 3, work)) == [0, 10, 20, 30, 40, 50]
    assert asyncio.run(closed_loop_map([], 3, work)) == []


def test_concurrency_must_be_positive():
    async def work(item):
        return item

    with pytest.raises(ValueError, match="concurrency"):
        asyncio.run(closed_loop([1], 0, work))


def test_cancelling_the_caller_stops_every_worker():
    started, finished = [], []

    async def work(item):
        started.append(item)
        await asyncio.sleep(10)
        finished.append(item)

    async def main():
        loop = asyncio.create_task(closed_loop(range(10), 3, work))
        await asyncio.sleep(0.01)
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop
        await asyncio.sleep(0)

    asyncio.run(main())
    assert started == [0, 1, 2] and finished == []
