"""The bench's in-process engine: the gateway's engine API (validation, admission, the replica's
engine loop with its scheduler, KV block accounting and output processor) driving a shard's step
executor in the same process, with no gRPC on either side. Measured beside the server, it shows
what the gRPC hops and the client streams cost (`shardgate bench --in-process`).

One replica of one rank (tp = pp = 1): model parallelism needs its processes."""

from __future__ import annotations

import asyncio
import sys
import time
from argparse import Namespace
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tqdm import tqdm

from shardgate.clients.tools.bench_metrics import RequestRecord
from shardgate.clients.tools.workload import WorkItem
from shardgate.server import event_loop

if TYPE_CHECKING:  # the server's modules load only when the harness is built
    from shardgate.server.engine import Engine
    from shardgate.server.engine_api import EngineAPI

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

    def watch_stopping(self, callback) -> None:
        """A replica in this process has no driver to be told to stop (SIGTERM): nothing to watch."""


@dataclass(frozen=True)
class InProcessEngine:
    """The engine API over one replica whose model runs in this process."""

    api: EngineAPI
    loop: Engine
    """The replica's engine loop: run it while the API is used."""


def build_engine(args: Namespace) -> InProcessEngine:
    """The gateway's engine API over this process's own model, built from the serve flags of
    the bench command the way `shardgate serve` builds it (the same shard config, model build
    and replica description)."""
    from tokenizers import Tokenizer

    from shardgate.server.block_manager import BlockManager
    from shardgate.server.cli import config_from_args
    from shardgate.server.embed_batcher import DynamicBatcher
    from shardgate.server.engine import Engine
    from shardgate.server.engine_api import EngineAPI
    from shardgate.server.replicas.launcher import shard_config
    from shardgate.server.replicas.supervisor import ReplicaSupervisor
    from shardgate.server.scheduler import Scheduler
    from shardgate.server.telemetry import Telemetry
    from shardgate.shards.executor import StepExecutor
    from shardgate.shards.parallel import ParallelConfig, ParallelState
    from shardgate.shards.rank_model import build_rank_model, describe_replica, resolve_device

    if args.tp != 1 or args.pp != 1 or args.replicas != 1:
        raise ValueError("--in-process runs one replica of one rank: drop --tp, --pp and --replicas")
    gateway = config_from_args(args)
    config = shard_config(gateway.replica, gateway.scheduler, listen=IN_PROCESS)
    device = resolve_device(config.replica.device, 0)
    parallel = ParallelState(ParallelConfig())
    rank_model = build_rank_model(config, device, parallel)
    description = describe_replica(rank_model, config, device, parallel)
    tokenizer = Tokenizer.from_str(description.tokenizer_json)
    batcher = DynamicBatcher(gateway.embed, gateway.scheduler.priority_aging_s)
    telemetry = Telemetry(gateway.telemetry)
    engine = Engine(
        0,
        Scheduler(gateway.scheduler, BlockManager(description.num_kv_blocks, description.block_size)),
        _DirectReplica(StepExecutor(rank_model.runner, parallel)),
        tokenizer,
        description.model.eos_token_ids,
        batcher,
        telemetry=telemetry.replica(0, 1),
    )
    api = EngineAPI(gateway, telemetry)

    async def unchanged() -> None:
        pass

    api.attach([engine], batcher, tokenizer, [description], [ReplicaSupervisor(engine, gateway, unchanged)])
    return InProcessEngine(api, engine)


async def _timed(api: EngineAPI, item: WorkItem, index: int, ignore_eos: bool) -> RequestRecord:
    """One greedy request through the engine API, timed as the bench's gRPC clients time theirs."""
    from shardgate.proto import inference_pb2
    from shardgate.server.validation import RequestError

    request = inference_pb2.GenerateRequest(
        request_id=f"in-process-{index}",
        prompt_token_ids=inference_pb2.TokenIds(ids=item.prompt_ids),
        max_new_tokens=item.max_new_tokens,
        temperature=0.0,
        ignore_eos=ignore_eos,
    )
    record = RequestRecord(start=time.perf_counter(), prompt_tokens=len(item.prompt_ids))
    try:
        generation = await api.generate(request)
        async with aclosing(generation.outputs()) as outputs:
            async for output in outputs:
                now = time.perf_counter()
                record.token_times += [now] * len(output.token_ids)
    except RequestError as error:
        record.error = error.code.name
    record.end = time.perf_counter()
    return record


async def _closed_loop(api: EngineAPI, items: list[WorkItem], concurrency: int, ignore_eos: bool, progress: bool) -> list[RequestRecord]:
    from shardgate.clients.tools.pool import closed_loop_map

    bar = tqdm(
        total=len(items), unit="req", desc=IN_PROCESS, disable=None if progress else True, file=sys.stderr, dynamic_ncols=True, leave=False
    )

    async def run(index: int) -> RequestRecord:
        record = await _timed(api, items[index], index, ignore_eos)
        bar.update(1)
        return record

    records = await closed_loop_map(range(len(items)), concurrency, run)
    bar.close()
    return records


async def _run(
    engine: InProcessEngine, levels: list[tuple[list[WorkItem], int]], ignore_eos: bool, warmup: int, progress: bool
) -> list[list[RequestRecord]]:
    loop = asyncio.create_task(engine.loop.run(), name="in-process engine")
    try:
        results = []
        for items, concurrency in levels:
            for index, item in enumerate(items[:warmup]):  # as each server run warms up
                await _timed(engine.api, WorkItem(item.prompt_ids, min(item.max_new_tokens, 8)), -1 - index, True)
            results.append(await _closed_loop(engine.api, items, concurrency, ignore_eos, progress))
        return results
    finally:
        loop.cancel()


def run_in_process(
    engine: InProcessEngine, levels: list[tuple[list[WorkItem], int]], ignore_eos: bool, warmup: int, progress: bool
) -> list[list[RequestRecord]]:
    """Each level's workload (items, concurrency) in turn through an in-process engine
    (build_engine), closed loop; the records of each level."""
    return event_loop.run(_run(engine, levels, ignore_eos, warmup, progress))
