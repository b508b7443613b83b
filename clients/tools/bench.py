"""`shardgate bench`: load-test a server (a running one, or one it starts) with a seeded
synthetic workload over one or more protocols (native gRPC, OpenAI HTTP, ...: protocols.py),
optionally against Hugging Face transformers on the same checkpoint, and report throughput,
latency percentiles and cost as a table (and JSON), with each protocol's ratio to native."""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from shardgate.clients.errors import ShardgateError
from shardgate.clients.tools.arguments import client_options, connection_arguments, workload_arguments
from shardgate.clients.tools.bandwidth import HardwareReport, read_bandwidth
from shardgate.clients.tools.bench_metrics import Summary, summarize
from shardgate.clients.tools.bucket_hits import BucketHits
from shardgate.clients.tools.in_process import IN_PROCESS
from shardgate.clients.tools.protocols import GRPC, NATIVE, PROTOCOLS
from shardgate.clients.tools.workload import WorkItem, WorkloadConfig, make_workload, poisson_arrivals, text_workload
from shardgate.proto.common import DTYPE_BYTES, free_port
from shardgate.server import event_loop

SHARDGATE = "shardgate"
"""The native protocol's column; another protocol's is `shardgate <protocol>`."""


def protocol_label(protocol: str) -> str:
    return SHARDGATE if protocol == NATIVE else f"{SHARDGATE} {protocol}"


HF_ONE = "hf one-at-a-time"
EAGER = "eager (--no-compile)"
"""The column of the same server with its decode step not compiled (--compare-compile)."""


def hf_static(batch_size: int) -> str:
    return f"hf static batch {batch_size}"


@dataclass(frozen=True)
class LoadConfig:
    """How the workload is sent."""

    concurrency: int | None = 8
    """Closed loop: this many requests always in flight (None with a rate)."""
    rate: float | None = None
    """Open loop: Poisson arrivals at this many requests per second."""
    ignore_eos: bool = True
    """Generate exactly max_new_tokens (the workload's output lengths)."""
    warmup: int = 2
    """Short requests sent before measuring."""
    device_cost_per_hour: float = 0.0
    """Price of one device-hour, for the cost per million tokens (0 = not shown)."""

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("give one of --concurrency and --rate")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("--concurrency must be >= 1")
        if self.warmup < 0 or self.device_cost_per_hour < 0:
            raise ValueError("--warmup and --device-cost-per-hour must be >= 0")

    @property
    def batch_size(self) -> int:
        """The static baseline's batch: the concurrency (8 in open loop without one)."""
        return self.concurrency or 8

    def describe(self) -> str:
        return f"closed loop, concurrency {self.concurrency}" if self.rate is None else f"open loop, Poisson {self.rate:g} req/s"


@dataclass(frozen=True)
class Level:
    """One load level of a run: its workload and how it is sent."""

    workload: WorkloadConfig
    load: LoadConfig


@dataclass(frozen=True)
class ServerRun:
    summary: Summary
    items: list[WorkItem]
    """The requests sent (the baselines send the same)."""
    model: str
    dtype: str
    device: str
    weight_bytes_per_step: int
    kv_bytes_per_token: int
    kv_theory_bytes_per_token: int


async def bench_server(
    address: str,
    client_options: dict,
    workload: WorkloadConfig,
    load: LoadConfig,
    progress: bool,
    *,
    protocol: str = NATIVE,
    http_address: str | None = None,
    text_prompts: bool = False,
) -> ServerRun:
    """Runs the workload against the server at address (gRPC; http_address: its HTTP port)
    over `protocol` and summarizes it. With text_prompts the prompts are text (text_workload,
    counted by the server's tokenizer), else token ids."""
    from shardgate.clients.async_client import AsyncClient
    from shardgate.clients.tools.load import run_load, warm_up

    async with AsyncClient(address, **client_options) as client:
        info = await client.model_info()
        if text_prompts:
            items = await text_workload(workload, lambda text: client.tokenize(text, add_special_tokens=True))
        else:
            items = make_workload(workload, info.vocab_size, frozenset(info.eos_token_ids))
    spec = PROTOCOLS[protocol]
    async with spec.load()(address if spec.port == GRPC else http_address, client_options) as driver:
        await warm_up(driver, items, load.warmup)
        arrivals = None if load.rate is None else poisson_arrivals(len(items), load.rate, workload.seed)
        records = await run_load(
            driver,
            items,
            concurrency=load.concurrency if arrivals is None else None,
            arrivals=arrivals,
            ignore_eos=load.ignore_eos,
            progress=progress,
            label=protocol_label(protocol),
        )
    summary = summarize(records, load.device_cost_per_hour, devices=len(info.devices))
    return ServerRun(
        summary,
        items,
        info.model,
        info.dtype,
        info.devices[0] if info.devices else "cpu",
        info.weight_bytes_per_step,
        info.kv_bytes_per_token,
        2 * info.num_hidden_layers * info.num_key_value_heads * info.head_dim * DTYPE_BYTES[info.dtype],
    )


def hardware_report(run: ServerRun, levels: list[Level], results: list[dict[str, Summary]]) -> HardwareReport:
    """The bandwidth bound of a batch-1 decode step (measured here, on the server's device type,
    after the server has stopped) beside shardgate's time per output token at concurrency 1."""
    single = next((index for index, level in enumerate(levels) if level.load.concurrency == 1 and SHARDGATE in results[index]), None)
    step = None if single is None else results[single][SHARDGATE].tpot_ms["p50"] / 1e3
    return HardwareReport(
        run.weight_bytes_per_step, read_bandwidth(run.device), step, run.kv_bytes_per_token, run.kv_theory_bytes_per_token
    )


def bench_hf(checkpoint: Path, runs: list[ServerRun], levels: list[Level], progress: bool) -> dict[int, dict[str, Summary]]:
    """The transformers baseline on the same checkpoint, dtype, device type and workloads: one
    request at a time (once, on the workload of concurrency 1 if there is one, else the first
    level's) and statically batched at each concurrency above 1."""
    from shardgate.clients.tools.baseline_hf import load_model, run_static_batches

    run = runs[0]
    device = "cuda" if run.device.startswith("cuda") else "cpu"
    model = load_model(checkpoint, run.dtype, device)
    results: dict[int, dict[str, Summary]] = {index: {} for index in range(len(levels))}
    sequential = next((i for i, level in enumerate(levels) if level.load.batch_size == 1), 0)
    for index, level in enumerate(levels):
        items = runs[index].items
        baselines = [(HF_ONE, 1)] if index == sequential else []
        if level.load.batch_size > 1:  # a batch of 1 is one at a time
            baselines.append((hf_static(level.load.batch_size), level.load.batch_size))
        for name, size in baselines:
            records = run_static_batches(model, items, size, level.load.ignore_eos, progress, name)
            results[index][name] = summarize(records, level.load.device_cost_per_hour, devices=1)
    for level_results in results.values():  # every table shows the one-at-a-time baseline
        level_results.setdefault(HF_ONE, results[sequential][HF_ONE])
    return results


def bench_in_process(args: argparse.Namespace, runs: list[ServerRun], levels: list[Level], progress: bool) -> dict[int, Summary]:
    """The same engine in one process, no gRPC (clients/tools/in_process.py), at each closed-loop level."""
    from shardgate.clients.tools.in_process import build_engine, run_in_process

    engine = build_engine(args)
    workloads = [(run.items, level.load.concurrency) for run, level in zip(runs, levels)]
    load = levels[0].load  # ignore_eos, warmup and price are the same at every level
    records = run_in_process(engine, workloads, load.ignore_eos, load.warmup, progress)
    return {index: summarize(level_records, load.device_cost_per_hour, devices=1) for index, level_records in enumerate(records)}


def bench_profile(args: argparse.Namespace, levels: list[Level]) -> tuple[list, object]:
    """Decode steps at each level's concurrency, profiled in this process (step_profile.py):
    compiled as served, and eager too with --compare-compile; and the model's linears alone
    (linear_bounds.py)."""
    from shardgate.clients.tools.step_profile import profile_steps

    batches = [level.load.concurrency for level in levels]
    workload = levels[0].workload
    context = round(_mean(workload.prompt_len) + _mean(workload.output_len) / 2)
    eager = []
    if args.compare_compile:  # first: once the compiled profile loaded the paged kernel, this process's decodes use it
        args.compile = False
        eager, _ = profile_steps(args, batches, context)
        args.compile = True
    profiles, bounds = profile_steps(args, batches, context, bounds=True)
    return profiles + eager, bounds


def _mean(lengths) -> float:
    return (lengths.low + lengths.high) / 2


# --- report -------------------------------------------------------------------------------

ROWS = [
    ("requests", lambda s: s.requests, "{:.0f}"),
    ("errors", lambda s: s.errors, "{:.0f}"),
    ("output tokens/s", lambda s: s.output_tokens_per_s, "{:.1f}"),
    ("requests/s", lambda s: s.requests_per_s, "{:.2f}"),
    *[(f"TTFT {p} ms", (lambda s, p=p: s.ttft_ms[p]), "{:.1f}") for p in ("p50", "p90", "p99")],
    *[(f"ITL {p} ms", (lambda s, p=p: s.itl_ms[p]), "{:.1f}") for p in ("p50", "p90", "p99")],
    *[(f"TPOT {p} ms", (lambda s, p=p: s.tpot_ms[p]), "{:.1f}") for p in ("p50", "p90", "p99")],
    *[(f"e2e {p} ms", (lambda s, p=p: s.e2e_ms[p]), "{:.0f}") for p in ("p50", "p90", "p99")],
    ("$ per 1M output tokens", lambda s: s.cost_per_million_tokens, "{:.4f}"),
]
RATIO_ROWS = (
    "output tokens/s",
    "requests/s",
    "TTFT p50 ms",
    "TTFT p99 ms",
    "ITL p50 ms",
    "ITL p99 ms",
    "TPOT p50 ms",
    "TPOT p99 ms",
    "e2e p50 ms",
    "e2e p99 ms",
    "$ per 1M output tokens",
)


def is_protocol(name: str) -> bool:
    """Whether a result column is shardgate over another protocol (not a baseline)."""
    return name.startswith(SHARDGATE + " ")


def ratio_header(name: str) -> str:
    return f"{name.removeprefix(SHARDGATE + ' ')} ÷ native" if is_protocol(name) else f"shardgate ÷ {name.removeprefix('hf ')}"


def ratios(results: dict[str, Summary]) -> dict[str, dict[str, float]]:
    """Per metric, shardgate (native) ÷ each baseline, and each other protocol ÷ native: above
    1 is better for throughput, below 1 for latency and cost (none without a native run)."""
    ours = results.get(SHARDGATE)
    if ours is None:
        return {}
    getters = {name: get for name, get, _ in ROWS}
    out = {}
    for name, summary in results.items():
        if name == SHARDGATE:
            continue
        out[name] = {}
        for row in RATIO_ROWS:
            a, b = getters[row](summary if is_protocol(name) else ours), getters[row](ours if is_protocol(name) else summary)
            out[name][row] = a / b if a is not None and b not in (None, 0) and not math.isnan(b) else math.nan
    return out


def _cell(value, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def format_table(results: dict[str, Summary], title: str) -> str:
    names = list(results)
    ratio_table = ratios(results)
    headers = ["metric", *names, *[ratio_header(n) for n in ratio_table]]
    rows = []
    for label, get, fmt in ROWS:
        row = [label, *[_cell(get(results[n]), fmt) for n in names]]
        row += [_cell(ratio_table[b].get(label), "{:.2f}x") if label in RATIO_ROWS else "" for b in ratio_table]
        rows.append(row)
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    lines = [title, "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    if ratio_table:
        lines.append("ratio = shardgate ÷ baseline (or protocol ÷ native): above 1 is better for throughput, below 1 for latency and cost")
    return "\n".join(lines)


# --- command ------------------------------------------------------------------------------


def add_parser(commands) -> None:
    from shardgate.server import cli as server_cli

    parser = commands.add_parser(
        "bench",
        help="load-test a server with a synthetic workload (optionally against transformers)",
        description="Benchmark a running server (--addr) or one it starts from the serve flags (--model ...).",
    )
    connection_arguments(parser, addr_default=None)
    server_cli.add_arguments(
        parser.add_argument_group("server to start when there is no --addr (the `shardgate serve` flags; --host/--port are ignored)")
    )
    workload_arguments(parser)
    parser.add_argument(
        "--protocol",
        type=protocol_list,
        default=(NATIVE,),
        help=f"protocol(s) to drive, comma-separated, each at every level, side by side ({', '.join(PROTOCOLS)}; default native). "
        "With any but native alone, every protocol gets the same text prompts",
    )
    parser.add_argument("--http-addr", help="host:port of the server's HTTP API (--http-port), for --protocol openai with --addr")
    parser.add_argument(
        "--baseline",
        choices=("hf",),
        help="also run transformers generate on --model (a local Hugging Face folder, a .gguf file or builtin:smollm2), "
        "in the server's dtype",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="also run the same engine in this process with no gRPC (one rank): what the gateway round trip and streams cost",
    )
    parser.add_argument(
        "--compare-compile",
        action="store_true",
        help="also run every level on the same server with --no-compile, after the compiled one: an eager column and its ratio",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile decode steps at each level's concurrency in this process (torch.profiler): the step's shares of "
        "linears, attention, sampling and the rest (compiled and, with --compare-compile, eager)",
    )
    parser.add_argument(
        "--compare",
        metavar="FLAGS",
        action="append",
        type=serve_flags,
        default=[],
        help="also run every level on a server started with these serve flags added (quoted; repeatable, e.g. "
        "--compare=--no-async-scheduling --compare='--decode-steps 1'), one server after the other: a column "
        "`shardgate FLAGS` each, with its ratio to the first server (needs --model, not --addr)",
    )
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON (- for stdout)")
    parser.add_argument(
        "--make-model", metavar="DIR", type=Path, help="write the benchmark model (Llama, ~150M parameters) to DIR and exit"
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=bench_command)


def serve_flags(text: str) -> tuple[str, ...]:
    """A --compare value: `shardgate serve` flags, split as a shell would."""
    try:
        flags = tuple(shlex.split(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: {error}") from None
    if not flags or not flags[0].startswith("-"):
        raise argparse.ArgumentTypeError(f"expected serve flags such as --no-async-scheduling, got {text!r}")
    return flags


def protocol_list(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in PROTOCOLS]
    if not names or unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected distinct protocols among {', '.join(PROTOCOLS)}, got {text!r}")
    return names


def levels_from_args(args: argparse.Namespace) -> list[Level]:
    """One level per --concurrency value (one open-loop level with --rate)."""
    if args.rate is not None and args.concurrency is not None:
        raise ValueError("give one of --concurrency and --rate")
    concurrencies = [None] if args.rate is not None else list(args.concurrency or (8,))
    counts = list(args.num_requests)
    if len(counts) == 1:
        counts *= len(concurrencies)
    if len(counts) != len(concurrencies):
        raise ValueError(f"--num-requests gives {len(counts)} values for {len(concurrencies)} --concurrency levels")
    return [
        Level(
            WorkloadConfig(count, args.prompt_len, args.output_len, args.seed, args.shared_prefix_len),
            LoadConfig(concurrency, args.rate, args.ignore_eos, args.warmup, args.device_cost_per_hour),
        )
        for concurrency, count in zip(concurrencies, counts)
    ]


def configs_from_args(args: argparse.Namespace) -> tuple[WorkloadConfig, LoadConfig]:
    """The workload and load of a command that runs one level (tune)."""
    levels = levels_from_args(args)
    if len(levels) != 1:
        raise ValueError("this command runs one --concurrency level")
    return levels[0].workload, levels[0].load


def bench_command(args: argparse.Namespace) -> int:
    from shardgate.clients.tools.local_server import LocalServer, serve_argv

    if args.make_model is not None:
        from shardgate.clients.tools.bench_model import make_bench_model

        print(f"wrote the benchmark model to {make_bench_model(args.make_model)}")
        return 0
    try:
        levels = levels_from_args(args)
        options = client_options(args)
        checkpoint = None  # what --baseline hf loads
        if args.baseline == "hf":
            from shardgate.clients.tools.baseline_hf import checkpoint_of

            checkpoint = checkpoint_of(args.model)
        if args.in_process and (args.addr is not None or args.rate is not None):
            raise ValueError("--in-process needs --model (not --addr) and --concurrency (not --rate)")
        if args.compare_compile and (args.addr is not None or not args.compile):
            raise ValueError("--compare-compile starts the server itself, compiled then eager: give --model, not --addr or --no-compile")
        if args.profile and (args.addr is not None or args.rate is not None):
            raise ValueError("--profile needs --model (not --addr) and --concurrency (not --rate)")
        if args.compare and args.addr is not None:
            raise ValueError("--compare starts its own servers: it needs --model, not --addr")
        protocols = list(args.protocol)
        needs_http = any(PROTOCOLS[p].port != GRPC for p in protocols)
        if needs_http and args.addr is not None and args.http_addr is None:
            raise ValueError(f"--protocol {','.join(protocols)} with --addr needs --http-addr (the server's --http-port)")
        if needs_http and args.addr is None and args.http_port is None:
            args.http_port = free_port()  # the server bench starts serves HTTP too
        http_address = args.http_addr if args.addr is not None else f"127.0.0.1:{args.http_port}"
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    progress = not args.no_progress
    server = None
    runs: list[dict[str, ServerRun]] = []  # per level, per protocol
    hits: list[BucketHits] = []  # per level, with a compiled server started here
    eager_runs: list[ServerRun] = []
    text_prompts = protocols != [NATIVE]
    stats_dir = Path(tempfile.mkdtemp(prefix="shardgate-buckets-")) if args.addr is None and args.compile else None
    if stats_dir is not None:
        args.compile_stats_dir = str(stats_dir)
    compared: list[dict[str, Summary]] = [{} for _ in levels]  # per level, per --compare server

    def run_level(address: str, level: Level, protocol: str) -> ServerRun:
        load = bench_server(
            address, options, level.workload, level.load, progress, protocol=protocol, http_address=http_address, text_prompts=text_prompts
        )
        return event_loop.run(load)

    try:
        if args.addr is None:
            server = LocalServer(serve_argv(args)).start()
        for level in levels:
            before = BucketHits.read(stats_dir) if stats_dir is not None else None
            runs.append({protocol: run_level(args.addr or server.address, level, protocol) for protocol in protocols})
            if before is not None:
                hits.append(BucketHits.read(stats_dir) - before)
        if args.compare_compile:
            server.stop()
            args.compile, args.compile_stats_dir = False, ""
            server = LocalServer(serve_argv(args)).start()
            eager_runs = [run_level(server.address, level, NATIVE) for level in levels]
            args.compile = True
        for flags in args.compare:  # each on its own, after the first server stopped
            server.stop()
            server = LocalServer([*serve_argv(args), *flags]).start()
            for index, level in enumerate(levels):
                compared[index][f"{SHARDGATE} {shlex.join(flags)}"] = run_level(server.address, level, NATIVE).summary
    except (ShardgateError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            server.stop()  # the baselines get the machine to themselves
        if stats_dir is not None:
            shutil.rmtree(stats_dir, ignore_errors=True)
            args.compile_stats_dir = ""  # the in-process harness and the profile write none
    results = [
        {protocol_label(protocol): run.summary for protocol, run in level_runs.items()} | level_compared
        for level_runs, level_compared in zip(runs, compared)
    ]
    for level_results, eager in zip(results, eager_runs):
        level_results[EAGER] = eager.summary
    first_runs = [next(iter(level_runs.values())) for level_runs in runs]  # the baselines send their items
    if args.in_process:
        try:
            for index, summary in bench_in_process(args, first_runs, levels, progress).items():
                results[index][IN_PROCESS] = summary
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    if args.baseline == "hf":
        for index, summaries in bench_hf(checkpoint, first_runs, levels, progress).items():
            results[index] |= summaries
    profiles, bounds = [], None
    if args.profile:
        try:
            profiles, bounds = bench_profile(args, levels)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    out = sys.stderr if args.json == "-" else sys.stdout  # stdout: the JSON alone
    run = first_runs[0]
    for index, (level, level_results) in enumerate(zip(levels, results)):
        workload, load = level.workload, level.load
        title = (
            f"{run.model} ({run.dtype}, {run.device}): {workload.num_requests} requests, "
            f"prompt {f'{workload.shared_prefix_len} shared + ' if workload.shared_prefix_len else ''}{workload.prompt_len} tokens, "
            f"output {workload.output_len} tokens, {load.describe()}"
        )
        print(format_table(level_results, title), file=out)
        if hits:
            print("\n".join(hits[index].lines()), file=out)
        print(file=out)
    if profiles:
        print("decode step profile (torch.profiler, in this process):", file=out)
        print("\n".join(profile.line() for profile in profiles), file=out)
    if bounds is not None:
        print("\n".join(bounds.lines()), file=out)
    hardware = hardware_report(run, levels, results) if args.addr is None else None  # a remote server's device is not here
    if hardware is not None:
        print("\n".join(hardware.lines()), file=out)
    if args.json:
        document = {
            "model": run.model,
            "dtype": run.dtype,
            "device": run.device,
            "hardware": None if hardware is None else hardware.as_dict(),
            "levels": [
                {
                    "workload": {
                        **asdict(level.workload),
                        "prompt_len": str(level.workload.prompt_len),
                        "output_len": str(level.workload.output_len),
                    },
                    "load": asdict(level.load),
                    "results": {name: summary.as_dict() for name, summary in level_results.items()},
                    "ratios": ratios(level_results),
                    "decode_buckets": hits[index].as_dict() if hits else None,
                }
                for index, (level, level_results) in enumerate(zip(levels, results))
            ],
            "step_profiles": [profile.as_dict() for profile in profiles],
            "linear_bounds": None if bounds is None else bounds.as_dict(),
        }
        text = json.dumps(document, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0
