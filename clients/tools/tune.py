"""`shardgate tune`: find the batching settings that give the most tokens per second (or the
least cost) within a latency SLO. Starts a server for each setting of the sweep, runs the same
workload against it, plots throughput against p99 latency (PNG), and prints the winner as
`shardgate serve` flags."""

from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

from shardgate.clients.errors import ShardgateError, Unimplemented
from shardgate.clients.tools.arguments import int_list, workload_arguments
from shardgate.clients.tools.bench_metrics import Summary, summarize
from shardgate.clients.tools.workload import make_embed_texts
from shardgate.server import event_loop

SWEPT = frozenset({"host", "port", "max_num_seqs", "max_batch_tokens", "embed_max_queue_delay_us"})


@dataclass(frozen=True)
class SLO:
    """Latency targets in milliseconds (None: no target)."""

    ttft_p99_ms: float | None = None
    """99th percentile time to first token."""
    itl_p99_ms: float | None = None
    """99th percentile inter-token latency."""
    embed_p99_ms: float | None = None
    """99th percentile latency of an Embed call."""

    def met(self, summary: Summary) -> bool:
        return (
            summary.errors == 0
            and (self.ttft_p99_ms is None or summary.ttft_ms["p99"] <= self.ttft_p99_ms)
            and (self.itl_p99_ms is None or summary.itl_ms["p99"] <= self.itl_p99_ms)
        )

    def embed_met(self, summary: Summary) -> bool:
        return summary.errors == 0 and (self.embed_p99_ms is None or summary.e2e_ms["p99"] <= self.embed_p99_ms)


@dataclass(frozen=True)
class Trial:
    """One setting and what the workload measured with it."""

    flags: tuple[str, ...]
    """The `shardgate serve` flags of the setting."""
    summary: Summary

    @property
    def label(self) -> str:
        return " ".join(f.removeprefix("--") for f in self.flags)


def generation_settings(max_num_seqs: list[int], max_batch_tokens: list[int]) -> list[tuple[str, ...]]:
    return [("--max-num-seqs", str(s), "--max-batch-tokens", str(t)) for s, t in itertools.product(max_num_seqs, max_batch_tokens)]


def recommend(trials: list[Trial], meets, objective: str) -> Trial | None:
    """The trial within the SLO with the most output tokens/s (objective "throughput") or the
    least cost per token ("cost"); None when no trial meets the SLO."""
    valid = [t for t in trials if meets(t.summary)]
    if not valid:
        return None
    if objective == "cost":
        return min(valid, key=lambda t: t.summary.cost_per_million_tokens)
    return max(valid, key=lambda t: t.summary.output_tokens_per_s)


def recommend_embed(trials: list[Trial], slo: SLO) -> Trial | None:
    valid = [t for t in trials if slo.embed_met(t.summary)]
    return max(valid, key=lambda t: t.summary.requests_per_s) if valid else None


def plot(
    trials: list[Trial], slo: SLO, best: Trial | None, path: Path, embed_trials: list[Trial] = (), embed_best: Trial | None = None
) -> None:
    """Throughput against p99 TTFT and p99 ITL (and Embed calls/s against p99 latency), one
    point per setting, SLO lines dashed, the recommendation starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("TTFT p99 (ms)", lambda s: s.ttft_ms["p99"], slo.ttft_p99_ms),
        ("inter-token latency p99 (ms)", lambda s: s.itl_ms["p99"], slo.itl_p99_ms),
    ]
    columns = len(panels) + (1 if embed_trials else 0)
    figure, axes = plt.subplots(1, columns, figsize=(6 * columns, 4.8), squeeze=False)
    for axis, (xlabel, latency, target) in zip(axes[0], panels):
        _scatter(axis, trials, latency, lambda s: s.output_tokens_per_s, best, target)
        axis.set_xlabel(xlabel)
        axis.set_ylabel("output tokens/s")
    if embed_trials:
        axis = axes[0][-1]
        _scatter(axis, embed_trials, lambda s: s.e2e_ms["p99"], lambda s: s.requests_per_s, embed_best, slo.embed_p99_ms)
        axis.set_xlabel("Embed latency p99 (ms)")
        axis.set_ylabel("Embed calls/s")
    figure.suptitle("shardgate tune: throughput against p99 latency per setting")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _scatter(axis, trials, x_of, y_of, best, target) -> None:
    xs, ys = [x_of(t.summary) for t in trials], [y_of(t.summary) for t in trials]
    axis.plot(xs, ys, "o", color="tab:blue")
    for trial, x, y in zip(trials, xs, ys):
        axis.annotate(trial.label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if best is not None:
        axis.plot([x_of(best.summary)], [y_of(best.summary)], "*", color="tab:orange", markersize=16, label="recommended")
    if target is not None:
        axis.axvline(target, color="tab:red", linestyle="--", label=f"SLO {target:g} ms")
    axis.grid(alpha=0.3)
    if best is not None or target is not None:
        axis.legend(fontsize=8)


def _trial_line(trial: Trial, meets) -> str:
    s = trial.summary
    cost = "" if s.cost_per_million_tokens is None else f", ${s.cost_per_million_tokens:.4f}/1M tokens"
    return (
        f"  {trial.label:<40} {s.output_tokens_per_s:9.1f} tokens/s  TTFT p99 {s.ttft_ms['p99']:8.1f} ms  "
        f"ITL p99 {s.itl_ms['p99']:7.1f} ms{cost}  {'meets SLO' if meets(s) else 'misses SLO'}"
    )


async def serves_embed(address: str) -> bool:
    from shardgate.clients.async_client import AsyncClient

    async with AsyncClient(address, timeout=60) as client:
        try:
            await client.embed("probe")
        except Unimplemented:
            return False
    return True


async def measure_embed(address: str, texts: list[str], concurrency: int, device_cost_per_hour: float) -> Summary:
    from shardgate.clients.async_client import AsyncClient
    from shardgate.clients.tools.load import run_embed_load

    async with AsyncClient(address) as client:
        await client.embed(texts[0])  # warm up
        return summarize(await run_embed_load(client, texts, concurrency), device_cost_per_hour)


def add_parser(commands) -> None:
    from shardgate.server import cli as server_cli

    parser = commands.add_parser(
        "tune",
        help="sweep batching settings against a latency SLO, plot, recommend serve flags",
        conflict_handler="resolve",  # the swept flags replace serve's single-valued ones
    )
    server_cli.add_arguments(parser.add_argument_group("server (the `shardgate serve` flags; --host/--port are ignored)"))
    sweep = parser.add_argument_group("sweep")
    sweep.add_argument("--max-num-seqs", type=int_list, default=[4, 16, 64], help="values to try, comma-separated (default 4,16,64)")
    sweep.add_argument("--max-batch-tokens", type=int_list, default=[512, 2048], help="values to try (default 512,2048)")
    sweep.add_argument(
        "--embed-max-queue-delay-us",
        type=int_list,
        default=[0, 2000, 10000],
        help="Embed batching delays to try when the server serves Embed (default 0,2000,10000)",
    )
    sweep.add_argument("--no-embed", action="store_true", help="skip the Embed sweep")
    target = parser.add_argument_group("target")
    target.add_argument("--slo-ttft-p99", type=float, default=None, help="p99 time to first token, ms")
    target.add_argument("--slo-itl-p99", type=float, default=None, help="p99 inter-token latency, ms")
    target.add_argument("--slo-embed-p99", type=float, default=None, help="p99 Embed call latency, ms")
    target.add_argument("--objective", choices=("throughput", "cost"), default="throughput", help="most tokens/s, or least $ per token")
    workload_arguments(parser)
    parser.add_argument("--plot", type=Path, default=Path("tune.png"), help="PNG to write (default %(default)s)")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=tune_command)


def tune_command(args: argparse.Namespace) -> int:
    from shardgate.clients.tools.bench import bench_server, configs_from_args
    from shardgate.clients.tools.local_server import LocalServer, serve_argv

    try:
        workload, load = configs_from_args(args)
        if args.objective == "cost" and load.device_cost_per_hour <= 0:
            raise ValueError("--objective cost needs --device-cost-per-hour")
        if 0 in args.max_num_seqs or 0 in args.max_batch_tokens:
            raise ValueError("--max-num-seqs and --max-batch-tokens values must be >= 1")
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    slo = SLO(args.slo_ttft_p99, args.slo_itl_p99, args.slo_embed_p99)
    base = serve_argv(args, skip=SWEPT)
    progress = not args.no_progress
    trials, embed_trials, embed_served = [], [], None
    print(
        f"tuning on {workload.num_requests} requests, prompt {workload.prompt_len}, output {workload.output_len}, {load.describe()}",
        file=sys.stderr,
    )
    try:
        for flags in generation_settings(args.max_num_seqs, args.max_batch_tokens):
            with LocalServer(base + list(flags)) as server:
                run = event_loop.run(bench_server(server.address, {}, workload, load, progress))
                if embed_served is None and not args.no_embed:
                    embed_served = event_loop.run(serves_embed(server.address))
            trials.append(Trial(flags, run.summary))
            print(_trial_line(trials[-1], slo.met), file=sys.stderr)
        best = recommend(trials, slo.met, args.objective)
        if embed_served is False:
            print("skipping the Embed queue-delay sweep: this server does not implement Embed (UNIMPLEMENTED)", file=sys.stderr)
        elif embed_served:
            texts = make_embed_texts(workload)
            for delay in args.embed_max_queue_delay_us:  # on the recommended generation setting
                flags = ("--embed-max-queue-delay-us", str(delay))
                with LocalServer(base + list(best.flags if best else ()) + list(flags)) as server:
                    summary = event_loop.run(measure_embed(server.address, texts, load.batch_size, load.device_cost_per_hour))
                embed_trials.append(Trial(flags, summary))
                print(
                    f"  {embed_trials[-1].label:<40} {summary.requests_per_s:9.1f} Embed calls/s  p99 {summary.e2e_ms['p99']:8.1f} ms",
                    file=sys.stderr,
                )
    except (RuntimeError, ShardgateError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    embed_best = recommend_embed(embed_trials, slo) if embed_trials else None
    plot(trials, slo, best, args.plot, embed_trials, embed_best)
    print(f"plot: {args.plot}")
    if best is None:
        print("no setting meets the SLO; relax it or sweep smaller batches")
        return 1
    s = best.summary
    cost = "" if s.cost_per_million_tokens is None else f", ${s.cost_per_million_tokens:.4f} per 1M tokens"
    print(
        f"recommended ({args.objective}): {s.output_tokens_per_s:.1f} output tokens/s, TTFT p99 {s.ttft_ms['p99']:.1f} ms, "
        f"ITL p99 {s.itl_ms['p99']:.1f} ms{cost}"
    )
    flags = [*base, *best.flags, *(embed_best.flags if embed_best else ())]
    print("shardgate serve " + " ".join(flags))
    return 0
