"""The batch job's parts: line parsing, resuming from a partly written output, --retry-failed,
duplicate ids (against the in-process fake server)."""

import asyncio
import json

import grpc
import pytest

from shardgate.clients.async_client import AsyncClient
from shardgate.clients.tools.batch import BatchConfig, parse_line, run_batch, written_ids


def test_parse_line_takes_parameters_and_names_what_is_wrong():
    job = parse_line('{"id": 7, "prompt": "hi", "max_new_tokens": 3}', 1, {"max_new_tokens": 9, "temperature": 0})
    assert (job.id, job.prompt, job.params, job.error) == ("7", "hi", {"max_new_tokens": 3, "temperature": 0}, None)
    assert parse_line('{"prompt_token_ids": [1, 2]}', 5, {}).id == "line-5"
    assert parse_line('{"prompt_token_ids": [1, 2]}', 5, {}).prompt == [1, 2]
    assert "not valid JSON" in parse_line("{oops", 3, {}).error and parse_line("{oops", 3, {}).id == "line-3"
    assert "exactly one of prompt" in parse_line('{"id": "a"}', 1, {}).error
    assert "prompt must be a string" in parse_line('{"id": "a", "prompt": 3}', 1, {}).error
    assert "list of integers" in parse_line('{"id": "a", "prompt_token_ids": ["x"]}', 1, {}).error
    assert "unknown parameter 'topk'" in parse_line('{"id": "a", "prompt": "x", "topk": 1}', 1, {}).error
    with pytest.raises(ValueError, match="unknown generation parameters"):
        BatchConfig(input="in", output="out", defaults={"bogus": 1})


def test_written_ids_cuts_a_torn_last_line_and_can_drop_errors(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a", "text": "x"}\n{"id": "b", "error": {"code": "UNAVAILABLE", "message": "m"}}\n{"id": "c", "te')
    assert written_ids(out, retry_failed=False) == {"a", "b"}
    assert out.read_text().endswith("}\n")  # the torn line is gone
    assert written_ids(out, retry_failed=True) == {"a"}
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["a"]


def run(server, config):
    async def main():
        async with AsyncClient(server.address, timeout=10) as client:
            return await run_batch(client, config)

    return asyncio.run(main())


def test_job_writes_one_line_per_id_and_skips_what_is_done(server, tmp_path):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [{"id": f"q{i}", "prompt": f"p{i}"} for i in range(6)] + [{"id": "q1", "prompt": "repeated id"}]
    lines.append({"id": "typed", "prompt": "x", "top_k": "three"})  # a parameter of the wrong type
    source.write_text("".join(json.dumps(line) + "\n" for line in lines) + "\n")
    out.write_text('{"id": "q0", "text": "from an earlier run"}\n')
    server.fake.failures = [(grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens: too many")]

    summary = run(server, BatchConfig(source, out, concurrency=3, defaults={"max_new_tokens": 5}, progress=False))
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in results) == ["q0", "q1", "q2", "q3", "q4", "q5", "typed"]
    errors = {r["id"]: r["error"] for r in results if "error" in r}
    assert errors["typed"]["code"] == "INVALID_ARGUMENT" and len(errors) == 2  # the wrong type and the refused one
    assert (summary.done, summary.failed, summary.skipped, summary.completion_tokens) == (4, 2, 2, 12)
    assert {call.request.max_new_tokens for call in server.fake.calls} == {5}

    again = run(server, BatchConfig(source, out, retry_failed=True, progress=False))
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 7
    assert again.done == 1 and again.failed == 1  # the refused line succeeds now; the wrong type fails again
    assert "cost: $" in "\n".join(summary.lines(devices=2, device_cost_per_hour=3.0))
