"""`shardgate serve`: flags → GatewayConfig → run the gateway."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from shardgate.proto.common import DTYPES, QUANTIZATIONS, TracingConfig
from shardgate.server.config import (
    TRACE_STEPS,
    AdmissionConfig,
    EmbedBatcherConfig,
    GatewayConfig,
    ReplicaConfig,
    SchedulerConfig,
    SecurityConfig,
    SupervisionConfig,
    TelemetryConfig,
)


def _sizes(text: str) -> tuple[int, ...]:
    """A comma-separated list of batch sizes ("" for none)."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    gateway, replica, scheduler = GatewayConfig(), ReplicaConfig(), SchedulerConfig()
    admission, embed, supervision, telemetry = AdmissionConfig(), EmbedBatcherConfig(), SupervisionConfig(), TelemetryConfig()
    parser.add_argument("--model", default=replica.model, help="local Hugging Face folder, or builtin:tiny (default)")
    parser.add_argument("--host", default=gateway.host, help="address to bind (default %(default)s)")
    parser.add_argument("--port", type=int, default=gateway.port, help="public gRPC port (default %(default)s; 0 = any free)")
    parser.add_argument("--dtype", default=replica.dtype, choices=DTYPES)
    parser.add_argument(
        "--quantize",
        default=replica.quantize,
        choices=QUANTIZATIONS,
        help="weight quantization: none (default), or int8 (weight-only, per output channel)",
    )
    parser.add_argument(
        "--device", default=replica.device, help="auto (default: cuda with NCCL when available, else cpu with gloo), cpu, cuda"
    )
    parser.add_argument("--tp", type=int, default=replica.tp, help="tensor-parallel size of each replica (default %(default)s)")
    parser.add_argument("--pp", type=int, default=replica.pp, help="pipeline-parallel size of each replica (default %(default)s)")
    parser.add_argument("--replicas", type=int, default=gateway.replicas, help="replicas to start on this host (default %(default)s)")
    parser.add_argument(
        "--remote-replica",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="driver address of a replica started with torchrun (repeatable)",
    )
    parser.add_argument(
        "--max-batch-tokens", type=int, default=scheduler.max_batch_tokens, help="token budget of one step (default %(default)s)"
    )
    parser.add_argument("--max-num-seqs", type=int, default=scheduler.max_num_seqs, help="most sequences in one step (default %(default)s)")
    parser.add_argument(
        "--decode-steps",
        type=int,
        default=scheduler.decode_steps,
        help="decode steps per replica round trip while only decodes run and none wait (default %(default)s)",
    )
    parser.add_argument("--block-size", type=int, default=replica.block_size, help="tokens per KV block (default %(default)s)")
    parser.add_argument(
        "--kv-cache-memory",
        type=float,
        default=replica.kv_cache_memory,
        help="KV cache bytes (> 1), or fraction (0-1] of the memory left after the model and its largest step; "
        "default: 1 GiB on CPU, 0.9 on GPU",
    )
    parser.add_argument(
        "--max-new-tokens-limit",
        type=int,
        default=gateway.max_new_tokens_limit,
        help="largest max_new_tokens allowed (default %(default)s)",
    )
    parser.add_argument("--tls-cert", help="PEM certificate of the public port (with --tls-key: TLS only)")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument("--tls-client-ca", help="PEM CA bundle; clients must present a certificate it signed (mutual TLS)")
    parser.add_argument("--api-key-file", help="file of API keys, one per line; every method but health then needs one")
    parser.add_argument("--replica-tls-ca", help="PEM CA of remote replicas' driver certificates (mutual TLS to --remote-replica)")
    parser.add_argument("--replica-tls-cert", help="PEM certificate the gateway presents to remote replicas")
    parser.add_argument("--replica-tls-key", help="PEM private key of --replica-tls-cert")
    parser.add_argument(
        "--max-queue-requests",
        type=int,
        default=admission.max_queue_requests,
        help="most queued requests; more get RESOURCE_EXHAUSTED (default %(default)s)",
    )
    parser.add_argument(
        "--max-queue-tokens",
        type=int,
        default=admission.max_queue_tokens,
        help="most tokens queued requests may hold; more get RESOURCE_EXHAUSTED (default %(default)s)",
    )
    parser.add_argument(
        "--max-concurrent-requests",
        type=int,
        default=admission.max_concurrent_requests,
        help="most requests in progress; more get RESOURCE_EXHAUSTED (default %(default)s)",
    )
    parser.add_argument(
        "--priority-aging-s",
        type=float,
        default=scheduler.priority_aging_s,
        help="a waiting request gains one priority level per this many seconds (default %(default)s)",
    )
    parser.add_argument(
        "--prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=scheduler.prefix_caching,
        help="share the KV blocks of prompt prefixes already computed (default on)",
    )
    parser.add_argument(
        "--embed-max-batch-size", type=int, default=embed.max_batch_size, help="most inputs in one embedding batch (default %(default)s)"
    )
    parser.add_argument(
        "--embed-max-queue-delay-us",
        type=int,
        default=embed.max_queue_delay_us,
        help="a partial embedding batch runs once its oldest call waited this long (default %(default)s)",
    )
    parser.add_argument(
        "--embed-preferred-batch-sizes",
        type=_sizes,
        default=embed.preferred_batch_sizes,
        help="comma-separated input counts at which an embedding batch runs at once (default: none)",
    )
    parser.add_argument("--embed-max-inputs", type=int, default=embed.max_inputs, help="most inputs per Embed call (default %(default)s)")
    parser.add_argument(
        "--max-message-bytes",
        type=int,
        default=gateway.max_message_bytes,
        help="largest request message; larger ones get RESOURCE_EXHAUSTED (default %(default)s)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=gateway.drain_timeout_s,
        help="on SIGTERM, seconds in-flight requests get to finish (default %(default)s; 0: end them at once)",
    )
    parser.add_argument(
        "--step-timeout",
        type=float,
        default=supervision.step_timeout_s,
        help="a step unanswered this long marks its replica failed (default %(default)s s)",
    )
    parser.add_argument(
        "--restart-attempts",
        type=int,
        default=supervision.restart_attempts,
        help="consecutive restarts of a failed replica before giving up (default %(default)s)",
    )
    parser.add_argument(
        "--restart-backoff",
        type=float,
        default=supervision.restart_backoff_s,
        help="seconds before the first restart, doubling per attempt (default %(default)s)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=telemetry.metrics_port,
        help="serve Prometheus metrics on this port of --host (default: no metrics endpoint)",
    )
    parser.add_argument(
        "--trace-steps",
        default=telemetry.trace_steps,
        choices=TRACE_STEPS,
        help="which batch steps get spans when tracing (OTEL_EXPORTER_OTLP_ENDPOINT) is on: "
        "sampled (those serving a sampled request; default), all, none",
    )
    parser.add_argument(
        "--device-cost-per-hour",
        type=float,
        default=telemetry.device_cost_per_hour,
        help="price of one device-hour; responses then report usage.cost in that currency",
    )
    parser.add_argument("--log-level", default="INFO")


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    return GatewayConfig(
        host=args.host,
        port=args.port,
        max_new_tokens_limit=args.max_new_tokens_limit,
        replicas=args.replicas,
        remote_replicas=tuple(args.remote_replica),
        max_message_bytes=args.max_message_bytes,
        scheduler=SchedulerConfig(
            max_batch_tokens=args.max_batch_tokens,
            max_num_seqs=args.max_num_seqs,
            priority_aging_s=args.priority_aging_s,
            decode_steps=args.decode_steps,
            prefix_caching=args.prefix_caching,
        ),
        admission=AdmissionConfig(
            max_queue_requests=args.max_queue_requests,
            max_queue_tokens=args.max_queue_tokens,
            max_concurrent_requests=args.max_concurrent_requests,
        ),
        embed=EmbedBatcherConfig(
            max_batch_size=args.embed_max_batch_size,
            max_queue_delay_us=args.embed_max_queue_delay_us,
            preferred_batch_sizes=args.embed_preferred_batch_sizes,
            max_inputs=args.embed_max_inputs,
        ),
        replica=ReplicaConfig(
            model=args.model,
            dtype=args.dtype,
            quantize=args.quantize,
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
        drain_timeout_s=args.drain_timeout,
        supervision=SupervisionConfig(
            step_timeout_s=args.step_timeout, restart_attempts=args.restart_attempts, restart_backoff_s=args.restart_backoff
        ),
        security=SecurityConfig(
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
            api_key_file=args.api_key_file,
            replica_ca=args.replica_tls_ca,
            replica_cert=args.replica_tls_cert,
            replica_key=args.replica_tls_key,
        ),
    )


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ValueError as error:
        print(f"shardgate serve: error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from shardgate.server.app import serve  # the gateway's dependencies load only for `serve`

    try:
        asyncio.run(serve(config))
    except RuntimeError as error:
        logging.getLogger("shardgate.server").error("%s", error)
        return 1
    return 0
