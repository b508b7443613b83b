"""A shard process's entry point: read its config, join the replica's ranks, build this rank's
part of the model (shards/rank_model.py), then serve the gateway (the driver, rank 0:
shards/driver.py) or follow the driver's steps (every other rank).

Started by the gateway with `--config FILE` (one serialized ShardConfig message), or by torchrun
with the same settings as flags; either way with torchrun's environment: RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT. `python -m shardgate.shards.main --help` lists the flags.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import torch
from tokenizers import Tokenizer

from shardgate.proto.common import SHARD_ERROR_PREFIX, TracingConfig
from shardgate.proto.flags import add_flags, from_flags
from shardgate.proto.logs import configure_logging
from shardgate.proto.shard_config import ShardConfig
from shardgate.proto.tracing import init_tracing
from shardgate.shards import driver
from shardgate.shards.executor import StepExecutor
from shardgate.shards.faults import FaultInjector
from shardgate.shards.memory import CapacityError, RankMemory
from shardgate.shards.parallel import ParallelConfig, init_parallel
from shardgate.shards.rank_model import build_rank_model, describe_replica, resolve_device

log = logging.getLogger("shardgate.shard")


@dataclass(frozen=True)
class ShardProcess:
    """One shard process: its config and its place in the replica (torchrun's environment)."""

    config: ShardConfig
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    tracing: TracingConfig = field(default_factory=TracingConfig)
    """Whether and where this rank exports spans (the OTEL_* environment)."""

    def __post_init__(self) -> None:
        replica = self.config.replica
        if self.world_size != replica.tp * replica.pp:
            raise ValueError(f"WORLD_SIZE={self.world_size} but --tp {replica.tp} × --pp {replica.pp} = {replica.tp * replica.pp}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"RANK={self.rank} is outside WORLD_SIZE={self.world_size}")
        if self.rank == 0:  # the driver: the only rank that listens
            self.config.check_driver_link()

    @classmethod
    def from_environ(cls, config: ShardConfig, environ: Mapping[str, str]) -> ShardProcess:
        return cls(
            config,
            rank=int(environ.get("RANK", 0)),
            world_size=int(environ.get("WORLD_SIZE", 1)),
            local_rank=int(environ.get("LOCAL_RANK", 0)),
            tracing=TracingConfig.from_environ(environ),
        )


def parse_args(argv: list[str] | None = None) -> ShardConfig:
    """The config from `--config FILE` or from the flags; raises ValueError when it is not valid."""
    parser = argparse.ArgumentParser(prog="python -m shardgate.shards.main", description=__doc__)
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="the whole config as a serialized shardgate.shard.v1.ShardConfig message (as the gateway writes it); no other flag then",
    )
    add_flags(parser, ShardConfig)
    args = parser.parse_args(argv)
    if args.config is None:
        return from_flags(ShardConfig, args)
    if {k: v for k, v in vars(args).items() if k != "config"} != {k: v for k, v in vars(parser.parse_args([])).items() if k != "config"}:
        raise ValueError("--config holds the whole config: give no other flag with it")
    return ShardConfig.from_bytes(Path(args.config).read_bytes())


def stop_with(error: object) -> None:
    """States on stderr, in one line, why this shard stops (the gateway reports that line)."""
    print(f"{SHARD_ERROR_PREFIX}{error}", file=sys.stderr, flush=True)


def watch_parent(parent_pid: int, socket_path: str | None) -> None:
    """Exits this process soon after the gateway that started it is gone, however it died; the
    driver first removes its unix socket (socket_path), which no one else would."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        log.warning("gateway (pid %d) is gone; shard exiting", parent_pid)
        if socket_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(socket_path)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def follow_through_sigterm(rank: int) -> None:
    """Under torchrun, which forwards a node's SIGTERM to every rank, a rank other than the driver
    keeps following it: the driver hands its generations over to other replicas first, which
    takes steps of every rank, then tells the ranks to stop (torchrun's own SIGKILL bounds it)."""

    def note(*_) -> None:
        log.info("rank %d got SIGTERM: it stops when the driver tells it to", rank)

    signal.signal(signal.SIGTERM, note)


def exit_cleanly(provider) -> NoReturn:
    """Exits 0 once the replica was told to stop: spans exported and logs flushed, then without
    the interpreter's teardown, in which torch.distributed's C++ threads can abort the process
    (SIGABRT, "terminate called without an active exception") when another rank is gone first."""
    if provider is not None:
        provider.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    try:
        process = ShardProcess.from_environ(parse_args(argv), os.environ)
    except (ValueError, OSError) as error:  # a bad flag, config file or OTEL_* variable: one line, no traceback
        stop_with(error)
        return 2
    config = process.config
    configure_logging(logging.INFO, config.log_format)
    try:
        token = driver.link_token(config) if process.rank == 0 else None
    except ValueError as error:
        stop_with(error)
        return 2
    if config.parent_pid:
        watch_parent(config.parent_pid, driver.unix_socket_path(config.listen) if process.rank == 0 else None)
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", process.world_size))))

    try:
        faults = FaultInjector.from_environment(process.rank)
    except ValueError as error:
        stop_with(error)
        return 2
    device = resolve_device(config.replica.device, process.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    parallel = init_parallel(
        ParallelConfig(config.replica.tp, config.replica.pp),
        process.rank,
        process.world_size,
        backend="nccl" if device.type == "cuda" else "gloo",
        timeout_s=config.replica.collective_timeout_s,
    )
    try:
        rank_model = build_rank_model(config, device, parallel)
    except (CapacityError, ValueError, OSError) as error:
        # A model that cannot be loaded (a bad checkpoint, an unsupported architecture or tensor
        # type, a missing file) or served (no room for the KV cache): one line, no traceback.
        stop_with(error)
        return 2
    description = describe_replica(rank_model, config, device, parallel)
    faults.bind_tokenizer(lambda text: Tokenizer.from_str(description.tokenizer_json).encode(text, add_special_tokens=False).ids)
    provider = init_tracing(process.tracing, "shardgate-shard")
    tracer = provider.get_tracer("shardgate.shards") if provider is not None else None
    memory = RankMemory(rank_model.loaded.model, rank_model.runner.kv_cache.nbytes, rank_model.step_peak_bytes, device)
    executor = StepExecutor(rank_model.runner, parallel, tracer, faults, memory)
    if not parallel.is_driver:
        log.info("rank %d (tp %d, pp stage %d) following the driver", process.rank, parallel.tp_rank, parallel.pp_stage)
        if not config.parent_pid:
            follow_through_sigterm(process.rank)
        try:
            executor.follow()
        except Exception as error:  # a collective timed out or failed, or this rank's forward raised
            stop_with(f"rank {process.rank} stops after {type(error).__name__}: {error}")
            return 1
        exit_cleanly(provider)

    try:
        served = driver.serve(executor, description, config, token)
    except Exception as error:  # the ranks may be out of step: the replica must restart as a whole
        stop_with(f"rank 0 stops after {type(error).__name__}: {error}")
        return 1
    if not served:
        stop_with(f"cannot listen on {config.listen}")
        return 2
    executor.stop()
    exit_cleanly(provider)


if __name__ == "__main__":
    sys.exit(main())
