"""`shardgate bench --compare FLAGS`: servers started with other serve flags, side by side."""

import argparse

import pytest

from shardgate.clients.tools import bench
from shardgate.clients.tools.bench import SHARDGATE, format_table, ratios, serve_flags
from shardgate.clients.tools.bench_metrics import RequestRecord, summarize
from shardgate.clients.tools.local_server import serve_argv


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers())
    return parser.parse_args(["bench", *argv])


def test_compare_takes_serve_flags_as_a_shell_splits_them_and_adds_them_to_the_servers_own():
    args = parse("--model", "builtin:tiny", "--decode-steps", "2", "--compare=--no-async-scheduling", "--compare", "--decode-steps '4'")
    assert args.compare == [("--no-async-scheduling",), ("--decode-steps", "4")]
    assert [*serve_argv(args), *args.compare[1]] == ["--model", "builtin:tiny", "--decode-steps", "2", "--decode-steps", "4"]
    for text in ("", "decode-steps 4", "--stop 'unclosed"):
        with pytest.raises(argparse.ArgumentTypeError):
            serve_flags(text)


def test_a_compared_server_is_a_column_with_its_ratio_to_the_first():
    first = summarize([RequestRecord(0.0, 1, [0.1, 0.2], 0.2)], 1.0)
    other = summarize([RequestRecord(0.0, 1, [0.1, 0.3], 0.3)], 1.0)
    label = f"{SHARDGATE} --no-async-scheduling"
    results = {SHARDGATE: first, label: other}
    assert ratios(results)[label]["TPOT p50 ms"] == pytest.approx(2.0)
    assert "--no-async-scheduling ÷ native" in format_table(results, "title").splitlines()[1]


def test_compare_needs_a_server_the_bench_starts(capsys):
    assert bench.bench_command(parse("--addr", "127.0.0.1:1", "--compare=--no-async-scheduling")) == 2
    assert "--compare starts its own servers" in capsys.readouterr().err
