"""`shardgate serve`: flags → GatewayConfig → run the gateway."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from shardgate.server.config import TRACE_STEPS, GatewayConfig, ReplicaConfig, SchedulerConfig, TelemetryConfig, TracingConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    gateway, replica, scheduler, telemetry = GatewayConfig(), ReplicaConfig(), SchedulerConfig(), TelemetryConfig()
    parser.add_argument("--model", default=replica.model, help="local Hugging Face folder, or builtin:tiny (default)")
    parser.add_argument("--host", default=gateway.host, help="address to bind (default %(default)s)")
    parser.add_argument("--port", type=int, default=gateway.port, help="public gRPC port (default %(default)s; 0 = any free)")
    parser.add_argument("--dtype", default=replica.dtype, choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default=replica.device, help="auto (default: cuda with NCCL when available, else cpu with gloo), cpu, cuda")
    parser.add_argument("--tp", type=int, default=replica.tp, help="tensor-parallel size of each replica (default %(default)s)")
    parser.add_argument("--pp", type=int, default=replica.pp, help="pipeline-parallel size of each replica (default %(default)s)")
    parser.add_argument("--replicas", type=int, default=gateway.replicas, help="replicas to start on this host (default %(default)s)")
    parser.add_argument("--remote-replica", action="append", default=[], metavar="HOST:PORT",
                        help="driver address of a replica started with torchrun (repeatable)")  # fmt: skip
    parser.add_argument("--max-batch-tokens", type=int, default=scheduler.max_batch_tokens, help="token budget of one step (default %(default)s)")
    parser.add_argument("--max-num-seqs", type=int, default=scheduler.max_num_seqs, help="most sequences in one step (default %(default)s)")
    parser.add_argument("--block-size", type=int, default=replica.block_size, help="tokens per KV block (default %(default)s)")
    parser.add_argument("--kv-cache-memory", type=float, default=replica.kv_cache_memory,
                        help="KV cache bytes (> 1) or fraction of free memory (0-1]; default: 1 GiB on CPU, 0.9 on GPU")  # fmt: skip
    parser.add_argument("--max-new-tokens-limit", type=int, default=gateway.max_new_tokens_limit, help="largest max_new_tokens allowed (default %(default)s)")
    parser.add_argument("--metrics-port", type=int, default=telemetry.metrics_port,
                        help="serve Prometheus metrics on this port of --host (default: no metrics endpoint)")  # fmt: skip
    parser.add_argument("--trace-steps", default=telemetry.trace_steps, choices=TRACE_STEPS,
                        help="which batch steps get spans when tracing (OTEL_EXPORTER_OTLP_ENDPOINT) is on: "
                        "sampled (those serving a sampled request; default), all, none")  # fmt: skip
    parser.add_argument("--device-cost-per-hour", type=float, default=telemetry.device_cost_per_hour,
                        help="price of one device-hour; responses then report usage.cost in that currency")  # fmt: skip
    parser.add_argument("--log-level", default="INFO")


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    return GatewayConfig(
        host=args.host,
        port=args.port,
        max_new_tokens_limit=args.max_new_tokens_limit,
        replicas=args.replicas,
        remote_replicas=tuple(args.remote_replica),
        scheduler=SchedulerConfig(max_batch_tokens=args.max_batch_tokens, max_num_seqs=args.max_num_seqs),
        replica=ReplicaConfig(
            model=args.model,
            dtype=args.dtype,
            device=args.device,
            block_size=args.block_size,
            kv_cache_memory=args.kv_cache_memory,
            tp=args.tp,
            pp=args.pp,
        ),
        telemetry=TelemetryConfig(
            tracing=TracingConfig.from_environ(os.environ),
            trace_steps=args.trace_steps,
            metrics_port=args.metrics_port,
            device_cost_per_hour=args.device_cost_per_hour,
        ),
    )


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ValueError as error:
        print(f"shardgate serve: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from shardgate.server.app import serve  # the gateway's dependencies load only for `serve`

    try:
        asyncio.run(serve(config))
    except RuntimeError as error:
        logging.getLogger("shardgate.server").error("%s", error)
        return 1
    return 0
