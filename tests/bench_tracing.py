"""Throughput cost of tracing: the same load against two servers started alike, one with tracing
on (every request sampled, every step's spans exported to an OTLP receiver on loopback) and one
with tracing off, in alternating rounds so that both see the same machine.

    .venv/bin/python tests/bench_tracing.py                     # builtin:tiny, tp 2
    .venv/bin/python tests/bench_tracing.py --tp 1 --rounds 7 --requests 64
    .venv/bin/python tests/bench_tracing.py --variant metrics   # metrics served vs not (no tracing)

Prints each round's generated tokens per second and the median ratio (on / off).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from otlp_receiver import otlp_receiver
from servers import RunningServer, start_server

from shardgate.proto.common import free_port

OTEL_VARIABLES = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
)


def load(server: RunningServer, args: argparse.Namespace) -> float:
    """Runs one round of requests; generated tokens per second."""

    def one(i: int) -> int:
        with server.client() as client:
            prompt = f"request {i} " * (1 + i % 4)
            return client.generate(prompt, max_new_tokens=args.max_new_tokens, ignore_eos=True, seed=i).usage.completion_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        tokens = sum(pool.map(one, range(args.requests)))
    return tokens / (time.perf_counter() - start)


def start(log_dir: Path, args: argparse.Namespace, endpoint: str | None = None) -> RunningServer:
    """The plain server, or (given the receiver's endpoint) the variant: tracing on, or metrics served."""
    saved = {name: os.environ.pop(name) for name in OTEL_VARIABLES if name in os.environ}
    flags = ["--model", args.model, "--tp", str(args.tp), "--kv-cache-memory", str(64 << 20)]
    if endpoint and args.variant == "tracing":
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
        flags += ["--trace-steps", args.trace_steps]
    elif endpoint:
        flags += ["--metrics-port", str(free_port())]
    try:
        return start_server(log_dir, *flags)
    finally:
        os.environ.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
        os.environ.update(saved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:tiny")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=32, help="requests per round")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--keep-logs", action="store_true", help="keep the servers' logs (their folder is printed)")
    parser.add_argument("--variant", choices=("tracing", "metrics"), default="tracing", help="what the second server turns on")
    parser.add_argument("--trace-steps", default="sampled", help="--trace-steps of the traced server")
    args = parser.parse_args()

    logs = Path(tempfile.mkdtemp(prefix="bench-tracing-"))
    with otlp_receiver() as (endpoint, spans):
        servers = {"off": start(logs, args), "on": start(logs, args, endpoint)}
        try:
            for server in servers.values():
                load(server, args)  # warm-up
            rates: dict[str, list[float]] = {"off": [], "on": []}
            for round_ in range(args.rounds):
                for name in ("off", "on") if round_ % 2 == 0 else ("on", "off"):
                    rates[name].append(load(servers[name], args))
                print(f"round {round_ + 1}: off {rates['off'][-1]:7.1f} tok/s   on {rates['on'][-1]:7.1f} tok/s")
        finally:
            for server in servers.values():
                server.stop()
            if args.keep_logs:
                print(f"server logs in {logs}")
            else:
                shutil.rmtree(logs)
        off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
        print(f"median: off {off:.1f} tok/s, on {on:.1f} tok/s; tracing on / off = {on / off:.3f} ({len(spans.spans)} spans received)")


if __name__ == "__main__":
    main()
