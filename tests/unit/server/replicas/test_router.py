"""The router: where a new request goes, and where a failed replica's requests go."""

import asyncio

import grpc
import pytest
from fake_replica import ScriptedReplica

from shardgate.server.block_manager import BlockManager
from shardgate.server.config import SchedulerConfig
from shardgate.server.engine import Engine
from shardgate.server.output_processor import ErrorEvent
from shardgate.server.replicas.router import Router
from shardgate.server.request import SamplingParams
from shardgate.server.scheduler import Scheduler
from shardgate.server.validation import RequestError, ValidRequest
from shardgate.shards.builtin import EOS_ID, builtin_tokenizer

TOKENIZER = builtin_tokenizer()
PARAMS = SamplingParams(8, 0.0, 1.0, 0, 0, False, False)


def engines(*num_blocks: int) -> list[Engine]:
    """Engines whose loops do not run: what the router submits stays queued."""
    return [
        Engine(index, Scheduler(SchedulerConfig(), BlockManager(blocks, 4)), ScriptedReplica({}), TOKENIZER, (EOS_ID,))
        for index, blocks in enumerate(num_blocks)
    ]


def valid(prompt_len: int = 3) -> ValidRequest:
    return ValidRequest("r", [1] * prompt_len, PARAMS, [])


def run(scenario):
    async def main():  # engines make their asyncio primitives inside a loop, as the gateway does
        return scenario()

    return asyncio.run(main())


def test_a_request_goes_to_the_replica_with_the_most_spare_blocks():
    def scenario():
        small, large = engines(16, 32)
        router = Router([small, large])
        return [router.submit(valid()).replica for _ in range(2)]

    assert run(scenario) == [1, 1]  # 31 spare blocks after the first request: still more than 16


def test_spare_blocks_count_what_queued_requests_will_take():
    def scenario():
        router = Router(engines(64, 64))
        return [router.submit(valid(prompt_len=8)).replica for _ in range(4)]

    assert run(scenario) == [0, 1, 0, 1]  # a burst spreads over the replicas


def test_equal_spare_blocks_go_to_the_replica_with_fewer_requests():
    def scenario():
        busy, idle = engines(64, 63)
        Router([busy]).submit(valid())  # one block's worth queued: 63 spare, like the idle replica
        return Router([busy, idle]).submit(valid()).replica

    assert run(scenario) == 1


def test_unhealthy_replicas_are_skipped_and_none_left_is_unavailable():
    def scenario():
        first, second = engines(64, 16)
        router = Router([first, second])
        first.fail("test")
        picked = router.submit(valid()).replica
        second.fail("test")
        with pytest.raises(RequestError) as raised:
            router.submit(valid())
        return picked, raised.value, router.serving

    picked, error, serving = run(scenario)
    assert picked == 1 and error.code == grpc.StatusCode.UNAVAILABLE and error.field == "replicas" and not serving


def test_a_failed_replicas_unstarted_requests_move_to_a_healthy_one():
    def scenario():
        first, second = engines(64, 16)
        router = Router([first, second])
        handle = router.submit(valid())
        first.fail("test")
        return handle, first.num_active, second.num_active, second.scheduler.status().waiting

    handle, on_first, on_second, waiting = run(scenario)
    assert handle.replica == 1 and (on_first, on_second, waiting) == (0, 1, 1)


def test_orphans_with_no_healthy_replica_end_unavailable():
    def scenario():
        first, second = engines(64, 16)
        router = Router([first, second])
        second.fail("test")
        handle = router.submit(valid())
        first.fail("test")
        return handle.events.get_nowait()

    event = run(scenario)
    assert isinstance(event, ErrorEvent) and event.code == grpc.StatusCode.UNAVAILABLE


def test_a_request_running_on_failed_replicas_moves_once_then_ends_unavailable():
    def scenario():
        first, second = engines(64, 64)
        router = Router([first, second], max_request_retries=1)
        handle = router.submit(valid())
        failed = router.engines[handle.replica]
        failed.scheduler.schedule()  # it was running when its replica failed
        failed.fail("test")
        moved_to = handle.replica
        router.engines[moved_to].scheduler.schedule()
        router.engines[moved_to].fail("test")
        return failed.index, moved_to, handle.retries, handle.events.get_nowait()

    failed, moved_to, retries, event = run(scenario)
    assert moved_to != failed and retries == 1
    assert isinstance(event, ErrorEvent) and event.code == grpc.StatusCode.UNAVAILABLE and "failed 2 times" in event.message


def test_a_request_only_queued_on_a_failed_replica_moves_without_spending_a_retry():
    def scenario():
        first, second, third = engines(64, 64, 64)
        router = Router([first, second, third], max_request_retries=0)
        handle = router.submit(valid())
        router.engines[handle.replica].fail("test")
        return handle.retries, router.engines[handle.replica].healthy, handle.events.empty()

    assert run(scenario) == (0, True, True)
