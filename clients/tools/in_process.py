"""The bench's in-process engine: the gateway's per-replica engine loop (scheduler, KV block
accounting, output processor) driving a shard's step executor in the same process, with no gRPC
on either side. Measured beside the server, it shows what the gateway round trip, the engine
API's admission and the client streams cost (`shardgate bench --in-process`).

One replica of one rank (tp = pp = 1): model parallelism needs its processes."""

from __future__ import annotations

import asyncio
import sys
import time
from argparse import Namespace

from tqdm import tqdm

from shardgate.clients.tools.bench_metrics import RequestRecord
from shardgate.clients.tools.workload import WorkItem

IN_PROCESS = "in-process engine"


class _DirectReplica:
    """The engine's replica interface over a step executor in this process: each step runs to
    completion in the engine's loop, as a one-process server would."""

    def __init__(self, executor) -> None:
        from shardgate.server.replicas.client import plan_to_proto

        self.executor = executor
        self._plan_to_proto = plan_to_proto

    async def step(self, plan, timeout=None, metadata=(), report_timings=False):
        await asyncio.sleep(0)  # the readers take the tokens of the last step before this one blocks the loop
        message = self._plan_to_proto(plan)
        message.report_timings = report_timings
        return self.executor.run(message)


def build_engine(args: Namespace):
    """An Engine over this process's own model, from the serve flags of the bench command."""
    from tokenizers import Tokenizer

    from shardgate.server.block_manager import BlockManager
    from shardgate.server.cli import config_from_args
    from shardgate.server.engine import Engine
    from shardgate.server.replicas.launcher import shard_config
    from shardgate.server.scheduler import Scheduler
    from shardgate.shards.executor import StepExecutor
    from shardgate.shards.parallel import ParallelConfig, ParallelState
    from shardgate.shards.rank_model import build_rank_model, resolve_device

    if args.tp != 1 or args.pp != 1 or args.replicas != 1:
        raise ValueError("--in-process runs one replica of one rank: drop --tp, --pp and --replicas")
    gateway = config_from_args(args)
    config = shard_config(gateway.replica, gateway.scheduler, listen=IN_PROCESS)
    device = resolve_device(config.replica.device, 0)
    rank_model = build_rank_model(config, device, ParallelState(ParallelConfig()))
    executor = StepExecutor(rank_model.runner, ParallelState(ParallelConfig()))
    scheduler = Scheduler(gateway.scheduler, BlockManager(rank_model.num_blocks, config.replica.block_size))
    tokenizer = Tokenizer.from_str(rank_model.loaded.tokenizer_json)
    return Engine(0, scheduler, _DirectReplica(executor), tokenizer, tuple(rank_model.loaded.config.eos_token_ids))


async def _timed(engine, item: WorkItem, index: int, ignore_eos: bool) -> RequestRecord:
    from shardgate.server.output_processor import ErrorEvent, FinishEvent, TokenEvent
    from shardgate.server.request import SamplingParams
    from shardgate.server.validation import ValidRequest

    params = SamplingParams(item.max_new_tokens, 0.0, 1.0, 0, 0, ignore_eos, False)
    record = RequestRecord(start=time.perf_counter(), prompt_tokens=len(item.prompt_ids))
    handle = engine.submit(ValidRequest(f"in-process-{index}", list(item.prompt_ids), params, []))
    while True:
        event = await handle.events.get()
        if isinstance(event, TokenEvent):
            record.token_times.append(time.perf_counter())
        elif isinstance(event, ErrorEvent):
            record.error = event.code.name
        if isinstance(event, (FinishEvent, ErrorEvent)):
            break
    record.end = time.perf_counter()
    return record


async def _closed_loop(engine, items: list[WorkItem], concurrency: int, ignore_eos: bool, progress: bool) -> list[RequestRecord]:
    from shardgate.clients.tools.pool import closed_loop_map

    bar = tqdm(
        total=len(items), unit="req", desc=IN_PROCESS, disable=None if progress else True, file=sys.stderr, dynamic_ncols=True, leave=False
    )

    async def run(index: int) -> RequestRecord:
        record = await _timed(engine, items[index], index, ignore_eos)
        bar.update(1)
        return record

    records = await closed_loop_map(range(len(items)), concurrency, run)
    bar.close()
    return records


async def _run(
    engine, levels: list[tuple[list[WorkItem], int]], ignore_eos: bool, warmup: int, progress: bool
) -> list[list[RequestRecord]]:
    loop = asyncio.create_task(engine.run(), name="in-process engine")
    try:
        results = []
        for items, concurrency in levels:
            for index, item in enumerate(items[:warmup]):  # as each server run warms up
                await _timed(engine, WorkItem(item.prompt_ids, min(item.max_new_tokens, 8)), -1 - index, True)
            results.append(await _closed_loop(engine, items, concurrency, ignore_eos, progress))
        return results
    finally:
        loop.cancel()


def run_in_process(
    engine, levels: list[tuple[list[WorkItem], int]], ignore_eos: bool, warmup: int, progress: bool
) -> list[list[RequestRecord]]:
    """Each level's workload (items, concurrency) in turn through an in-process engine
    (build_engine), closed loop; the records of each level."""
    return asyncio.run(_run(engine, levels, ignore_eos, warmup, progress))
