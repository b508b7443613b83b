"""Benchmark and tuner parts without servers: workload, metrics, report, serve flags,
recommendation, plot; and the benchmark model's shape and tokenizer."""

import argparse
import asyncio
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shardgate.clients.tools.arguments import workload_arguments
from shardgate.clients.tools.bandwidth import HardwareReport
from shardgate.clients.tools.bench import (
    SHARDGATE,
    LoadConfig,
    configs_from_args,
    format_table,
    levels_from_args,
    protocol_label,
    protocol_list,
    ratios,
)
from shardgate.clients.tools.bench_metrics import RequestRecord, percentile, summarize
from shardgate.clients.tools.local_server import serve_argv
from shardgate.clients.tools.tune import SLO, Trial, generation_settings, plot, recommend
from shardgate.clients.tools.workload import Lengths, WorkloadConfig, make_workload, poisson_arrivals, text_workload
from shardgate.proto.models import default_model


def test_lengths_parse_fixed_and_ranges():
    assert Lengths.parse("32") == Lengths(32, 32) and Lengths.parse("16:64") == Lengths(16, 64)
    for bad in ("0", "9:3", "x", "1:y"):
        with pytest.raises(ValueError):
            Lengths.parse(bad)


def test_workload_is_seeded_and_respects_lengths_and_avoided_ids():
    config = WorkloadConfig(num_requests=50, prompt_len=Lengths(3, 9), output_len=Lengths(5, 5), seed=3)
    items = make_workload(config, vocab_size=20, avoid_ids=frozenset({0, 1}))
    assert items == make_workload(config, vocab_size=20, avoid_ids=frozenset({0, 1}))
    assert items != make_workload(WorkloadConfig(50, Lengths(3, 9), Lengths(5, 5), seed=4), 20, frozenset({0, 1}))
    assert {len(i.prompt_ids) for i in items} <= set(range(3, 10)) and len({len(i.prompt_ids) for i in items}) > 3
    assert {i.max_new_tokens for i in items} == {5}
    assert all(2 <= t < 20 for i in items for t in i.prompt_ids)


def test_a_shared_prefix_starts_every_prompt_and_leaves_the_rest_unchanged():
    plain = make_workload(WorkloadConfig(20, Lengths(3, 9), Lengths(5, 5), seed=3), vocab_size=50, avoid_ids=frozenset({0}))
    shared = make_workload(WorkloadConfig(20, Lengths(3, 9), Lengths(5, 5), seed=3, shared_prefix_len=16), 50, frozenset({0}))
    prefix = shared[0].prompt_ids[:16]
    assert all(item.prompt_ids[:16] == prefix and item.prompt_ids[16:] == own.prompt_ids for item, own in zip(shared, plain))
    assert 0 not in prefix and len(set(prefix)) > 1
    with pytest.raises(ValueError, match="shared-prefix-len"):
        WorkloadConfig(shared_prefix_len=-1)


def test_poisson_arrivals_have_the_rate():
    times = poisson_arrivals(4000, rate=20.0, seed=1)
    assert times == sorted(times) and times == poisson_arrivals(4000, 20.0, 1)
    assert 4000 / times[-1] == pytest.approx(20.0, rel=0.1)
    with pytest.raises(ValueError):
        poisson_arrivals(3, 0, 1)


def test_percentile_interpolates():
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 99) == 5 and percentile([0, 10], 90) == 9
    assert percentile([4, 1, 3, 2], 1) == 1.03 and percentile([1, 2, 3, 4], 99) == 3.97
    assert math.isnan(percentile([], 50))


def linear_interpolation(values, q):
    """The definition the bench has always used: rank (n - 1) × q / 100 of the sorted values,
    interpolated between its two neighbours."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@given(st.lists(st.floats(0, 1e3, allow_nan=False, allow_infinity=False), min_size=1, max_size=200), st.integers(1, 99))
def test_percentile_is_linear_interpolation_between_the_closest_ranks(values, q):
    # statistics sums the two weighted neighbours, the definition adds a fraction of their gap: equal up to rounding
    assert percentile(values, q) == pytest.approx(linear_interpolation(values, q), rel=1e-12, abs=1e-12)


def test_summarize_throughput_latencies_and_cost():
    records = [
        RequestRecord(start=0.0, prompt_tokens=4, token_times=[0.5, 1.0, 1.5], end=1.5),
        RequestRecord(start=1.0, prompt_tokens=4, token_times=[1.2, 2.0], end=2.0),
        RequestRecord(start=1.0, prompt_tokens=4, end=1.1, error="RESOURCE_EXHAUSTED"),
    ]
    s = summarize(records, device_cost_per_hour=3.6, devices=2)
    assert (s.requests, s.errors, s.output_tokens, s.duration_s) == (3, 1, 5, 2.0)
    assert s.output_tokens_per_s == 2.5 and s.requests_per_s == 1.0
    assert s.ttft_ms["p50"] == pytest.approx(350) and s.itl_ms["p50"] == pytest.approx(500)
    assert s.e2e_ms["p99"] == pytest.approx(1.5 * 1000 - 0.5 * 0.01 * 1000)
    assert s.cost_per_million_tokens == pytest.approx(3.6 * 2 * 2.0 / 3600 / 5 * 1e6)
    assert summarize(records).cost_per_million_tokens is None
    assert s.tpot_ms["p50"] == pytest.approx(650)  # (1.5 - 0.5) / 2 and (2.0 - 1.2) / 1


def test_time_per_output_token_ignores_how_tokens_were_grouped():
    bursts = RequestRecord(start=0.0, prompt_tokens=1, token_times=[0.1, 0.5, 0.5, 0.5, 0.5, 0.9], end=0.9)
    assert bursts.time_per_output_token == pytest.approx(0.16) and min(bursts.inter_token_latencies()) == 0
    assert RequestRecord(start=0.0, prompt_tokens=1, token_times=[0.1]).time_per_output_token is None


def bench_args(*argv):
    parser = argparse.ArgumentParser()
    workload_arguments(parser)
    parser.add_argument("--device-cost-per-hour", type=float, default=0.0)
    return parser.parse_args(argv)


def test_concurrency_levels_with_their_request_counts():
    levels = levels_from_args(bench_args("--concurrency", "1,32", "--num-requests", "8,64", "--shared-prefix-len", "4"))
    assert [(level.load.concurrency, level.workload.num_requests, level.workload.shared_prefix_len) for level in levels] == [
        (1, 8, 4),
        (32, 64, 4),
    ]
    assert [level.load.concurrency for level in levels_from_args(bench_args("--num-requests", "5"))] == [8]
    assert [level.workload.num_requests for level in levels_from_args(bench_args("--concurrency", "2,4", "--num-requests", "5"))] == [5, 5]
    with pytest.raises(ValueError, match="2 values for 3"):
        levels_from_args(bench_args("--concurrency", "1,2,3", "--num-requests", "1,2"))
    with pytest.raises(ValueError, match="one --concurrency level"):
        configs_from_args(bench_args("--concurrency", "1,2"))
    with pytest.raises(SystemExit):
        bench_args("--concurrency", "1,x")


def test_the_hardware_report_compares_the_batch_1_step_with_the_bandwidth_bound():
    report = HardwareReport(
        weight_bytes_per_step=200_000_000, bandwidth_bytes_per_s=20e9, step_s=0.025, kv_bytes_per_token=8192, kv_theory_bytes_per_token=8192
    )
    assert report.bound_s == pytest.approx(0.01)
    figures = report.as_dict()
    assert figures["step_over_bound"] == pytest.approx(2.5) and figures["kv_over_theory"] == 1.0
    bandwidth, kv = report.lines()
    assert "200.0 MB" in bandwidth and "20.0 GB/s" in bandwidth and "= 10.0 ms" in bandwidth and "2.50× the bound" in bandwidth
    assert "8192 bytes per token" in kv and "(1.000×)" in kv
    assert "no concurrency-1 level" in HardwareReport(1, 1.0, None, 1, 1).lines()[0]


def test_report_prints_both_sides_and_ratios():
    fast = summarize([RequestRecord(0.0, 1, [0.1, 0.2], 0.2)], 1.0)
    slow = summarize([RequestRecord(0.0, 1, [0.2, 0.4], 0.4)], 1.0)
    results = {SHARDGATE: fast, "hf one-at-a-time": slow}
    assert ratios(results)["hf one-at-a-time"]["output tokens/s"] == pytest.approx(2.0)
    assert ratios(results)["hf one-at-a-time"]["e2e p50 ms"] == pytest.approx(0.5)
    table = format_table(results, "title")
    header = table.splitlines()[1]
    assert "shardgate" in header and "hf one-at-a-time" in header and "shardgate ÷ one-at-a-time" in header
    assert "2.00x" in [line for line in table.splitlines() if line.startswith("output tokens/s")][0]


def test_load_config_needs_one_load_mode():
    with pytest.raises(ValueError):
        LoadConfig(concurrency=None, rate=None)
    with pytest.raises(ValueError):
        LoadConfig(concurrency=4, rate=2.0)
    assert LoadConfig(concurrency=None, rate=2.0).batch_size == 8 and LoadConfig(concurrency=32).batch_size == 32


def test_serve_argv_forwards_only_changed_serve_flags():
    from shardgate.server import cli as server_cli

    parser = argparse.ArgumentParser()
    server_cli.add_arguments(parser)
    parser.add_argument("--num-requests", type=int, default=3)
    args = parser.parse_args(["--model", "/m", "--max-num-seqs", "8", "--port", "1234", "--num-requests", "9"])
    assert serve_argv(args) == ["--model", "/m", "--max-num-seqs", "8"]
    assert serve_argv(args, skip=frozenset({"port", "max_num_seqs"})) == ["--model", "/m"]
    assert serve_argv(parser.parse_args(["--dtype", "bfloat16"])) == ["--model", default_model(), "--dtype", "bfloat16"]
    assert serve_argv(parser.parse_args(["--no-prefix-caching"])) == ["--model", default_model(), "--no-prefix-caching"]
    assert server_cli.config_from_args(parser.parse_args(["--no-prefix-caching"])).scheduler.prefix_caching is False
    assert server_cli.config_from_args(parser.parse_args([])).scheduler.prefix_caching is True


def _trial(seqs, tokens_per_s, ttft_p99, itl_p99, errors=0, cost=None):
    summary = summarize([RequestRecord(0.0, 1, [0.1, 0.2], 0.2)])
    summary = type(summary)(
        **{
            **summary.as_dict(),
            "output_tokens_per_s": tokens_per_s,
            "errors": errors,
            "cost_per_million_tokens": cost,
            "ttft_ms": {"p50": 1, "p90": 1, "p99": ttft_p99},
            "itl_ms": {"p50": 1, "p90": 1, "p99": itl_p99},
        }
    )
    return Trial(("--max-num-seqs", str(seqs), "--max-batch-tokens", "512"), summary)


def test_recommend_picks_the_best_within_the_slo():
    trials = [
        _trial(1, 100, 50, 10, cost=3.0),
        _trial(8, 400, 90, 20, cost=1.0),
        _trial(64, 900, 400, 60, cost=0.5),
        _trial(16, 999, 10, 10, errors=1),
    ]
    slo = SLO(ttft_p99_ms=100, itl_p99_ms=30)
    assert recommend(trials, slo.met, "throughput").flags[1] == "8"  # 64 misses the SLO, 16 had errors
    assert recommend(trials, SLO().met, "cost").flags[1] == "64"
    assert recommend(trials, SLO(ttft_p99_ms=1).met, "throughput") is None
    assert generation_settings([1, 4], [64]) == [
        ("--max-num-seqs", "1", "--max-batch-tokens", "64"),
        ("--max-num-seqs", "4", "--max-batch-tokens", "64"),
    ]


def test_plot_writes_a_png(tmp_path):
    from PIL import Image

    trials = [_trial(1, 100, 50, 10), _trial(8, 400, 90, 20)]
    path = tmp_path / "tune.png"
    plot(trials, SLO(ttft_p99_ms=100, itl_p99_ms=30), trials[1], path, embed_trials=trials, embed_best=trials[0])
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 1000 and image.size[1] > 400


def test_bench_model_shape_and_padded_tokenizer():
    from shardgate.clients.tools.bench_model import BOS_ID, EOS_ID, BenchModelShape, make_tokenizer

    assert BenchModelShape() == BenchModelShape(1024, 2816, 8, 16, 4, 32000, 2048)
    tokenizer = make_tokenizer(32000)
    assert tokenizer.get_vocab_size() == 32000
    assert tokenizer.id_to_token(BOS_ID) == "<s>" and tokenizer.id_to_token(EOS_ID) == "</s>"
    encoding = tokenizer.encode("The quick brown fox, 🙂")
    assert encoding.ids[0] == BOS_ID and tokenizer.decode(encoding.ids) == "The quick brown fox, 🙂"
    assert len(encoding.ids) < len("The quick brown fox, 🙂".encode())  # merges were learnt


def test_tuner_probes_and_measures_embed():
    import asyncio

    import grpc
    from fake_inference import start_fake_server

    from shardgate.clients.tools.tune import measure_embed, serves_embed

    server = start_fake_server()
    try:
        assert asyncio.run(serves_embed(server.address)) is True
        server.fake.failures = [(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")]
        assert asyncio.run(serves_embed(server.address)) is False
        summary = asyncio.run(measure_embed(server.address, ["a b", "c", "d e f"], concurrency=2, device_cost_per_hour=0))
    finally:
        server.stop()
    assert (summary.requests, summary.errors) == (3, 0) and summary.requests_per_s > 0 and summary.e2e_ms["p99"] > 0
    assert [call.method for call in server.fake.calls].count("Embed") == 2 + 1 + 3  # probes, warm-up, load


def test_protocol_ratios_are_protocol_over_native():
    native = summarize([RequestRecord(0.0, 1, [0.1, 0.2], 0.2)], 1.0)
    openai = summarize([RequestRecord(0.0, 1, [0.1, 0.25], 0.25)], 1.0)
    results = {SHARDGATE: native, protocol_label("openai"): openai}
    assert ratios(results)["shardgate openai"]["output tokens/s"] == pytest.approx(0.8)
    assert "openai ÷ native" in format_table(results, "title").splitlines()[1]
    assert ratios({protocol_label("openai"): openai}) == {}  # nothing to compare with


def test_protocol_list_refuses_unknown_and_repeated_names():
    assert protocol_list("native, openai") == ("native", "openai")
    for text in ("grpc", "native,native", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            protocol_list(text)


def test_text_workload_fits_each_prompt_in_its_length():
    async def tokenize(text: str) -> list[int]:  # a word-and-punctuation tokenizer with a BOS
        return [0] + [len(word) for word in text.replace(",", " ,").split()]

    config = WorkloadConfig(5, Lengths(4, 9), Lengths(2, 2), seed=3, shared_prefix_len=3)
    items = asyncio.run(text_workload(config, tokenize))
    again = asyncio.run(text_workload(config, tokenize))
    assert items == again  # seeded
    prefix = items[0].prompt_text.split()[:2]
    for item in items:
        assert item.prompt_text.split()[:2] == prefix  # BOS + 2 words = the 3 shared tokens
        assert item.prompt_ids == asyncio.run(tokenize(item.prompt_text))
        assert 3 + 4 <= len(item.prompt_ids) <= 3 + 9
