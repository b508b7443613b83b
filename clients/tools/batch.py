"""`shardgate batch IN.jsonl -o OUT.jsonl`: an offline job that loses nothing when interrupted.

Each input line is a JSON object: `id`, `prompt` (text) or `prompt_token_ids`, and any of
build_request's parameters (they override the command's defaults). Results are appended to
OUT as they finish, one line per id: `{"id", "text", "finish_reason", "usage"}` or, for a line
that failed, `{"id", "error": {"code", "message"}}`. A rerun skips every id already in OUT, so
an interrupted job resumes where it stopped; `--retry-failed` first drops the error lines so
those ids run again. Requests cut short by an interrupt are not written (they run on resume).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from shardgate.clients.async_client import AsyncClient
from shardgate.clients.errors import ShardgateError
from shardgate.clients.tools.pool import closed_loop

PARAMETERS = frozenset(
    {"max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos", "logprobs", "priority", "timeout_ms"}
)


@dataclass(frozen=True)
class BatchConfig:
    """One batch job."""

    input: Path
    """JSONL file of requests."""
    output: Path
    """JSONL file of results, appended to (and read first, to skip ids already done)."""
    concurrency: int = 16
    """Requests in flight at once."""
    defaults: dict = field(default_factory=dict)
    """Generation parameters of lines that do not set them."""
    retry_failed: bool = False
    """Run again the ids whose result in OUT is an error."""
    device_cost_per_hour: float = 0.0
    """Price of one device-hour, for the cost in the summary (0 = not shown)."""
    progress: bool = True
    """Show a progress bar on stderr."""

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError("--concurrency must be >= 1")
        if self.device_cost_per_hour < 0:
            raise ValueError("--device-cost-per-hour must be >= 0")
        unknown = set(self.defaults) - PARAMETERS
        if unknown:
            raise ValueError(f"unknown generation parameters {sorted(unknown)}")


@dataclass
class BatchSummary:
    done: int = 0
    """Lines answered in this run."""
    failed: int = 0
    """Error lines written in this run."""
    skipped: int = 0
    """Ids already in OUT (from an earlier run) or repeated in IN."""
    completion_tokens: int = 0
    elapsed_s: float = 0.0
    interrupted: bool = False

    def lines(self, devices: int, device_cost_per_hour: float) -> list[str]:
        rate = self.completion_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0
        lines = [
            f"{'interrupted' if self.interrupted else 'finished'}: {self.done} done, {self.failed} failed, "
            f"{self.skipped} skipped (already written)",
            f"{self.completion_tokens} tokens generated in {self.elapsed_s:.1f} s: {rate:.1f} tokens/s",
        ]
        if device_cost_per_hour > 0:
            cost = device_cost_per_hour * devices * self.elapsed_s / 3600
            lines.append(f"cost: ${cost:.4f} ({devices} device(s) at ${device_cost_per_hour}/hour)")
        if self.interrupted:
            lines.append("run the same command again to resume")
        return lines


@dataclass(frozen=True)
class Job:
    """One input line: a request to send, or the error that stops it from being sent."""

    id: str
    prompt: str | list[int] | None = None
    params: dict = field(default_factory=dict)
    error: str | None = None


def parse_line(line: str, number: int, defaults: dict) -> Job:
    """The job of input line `number` (1-based); lines without an id are keyed `line-N`."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        return Job(f"line-{number}", error=f"not valid JSON: {error}")
    if not isinstance(record, dict):
        return Job(f"line-{number}", error="a line must be a JSON object")
    job_id = str(record.pop("id", f"line-{number}"))
    prompt = record.pop("prompt", None)
    token_ids = record.pop("prompt_token_ids", None)
    if (prompt is None) == (token_ids is None):
        return Job(job_id, error="give exactly one of prompt and prompt_token_ids")
    if prompt is not None and not isinstance(prompt, str):
        return Job(job_id, error="prompt must be a string")
    if token_ids is not None and not (isinstance(token_ids, list) and all(isinstance(t, int) for t in token_ids)):
        return Job(job_id, error="prompt_token_ids must be a list of integers")
    unknown = sorted(set(record) - PARAMETERS)
    if unknown:
        return Job(job_id, error=f"unknown parameter {unknown[0]!r} (known: {', '.join(sorted(PARAMETERS))})")
    return Job(job_id, prompt if prompt is not None else token_ids, {**defaults, **record})


def written_ids(output: Path, retry_failed: bool) -> set[str]:
    """Ids already in OUT. A torn last line (the writer was killed mid-line) is cut off; with
    retry_failed, error lines are removed first."""
    if not output.exists():
        return set()
    data = output.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        output.write_bytes(data)
    records = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
    if retry_failed and any("error" in r for r in records):
        kept = [r for r in records if "error" not in r]
        temporary = output.with_name(output.name + ".tmp")
        temporary.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
        os.replace(temporary, output)
        records = kept
    return {r["id"] for r in records}


def pending_jobs(config: BatchConfig, done: set[str], summary: BatchSummary) -> Iterator[Job]:
    """The input's jobs whose ids are not done yet (each id once), read lazily."""
    seen = set(done)
    with open(config.input, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            job = parse_line(line, number, config.defaults)
            if job.id in seen:
                summary.skipped += 1
                continue
            seen.add(job.id)
            yield job


def count_pending(config: BatchConfig, done: set[str]) -> int:
    return sum(1 for _ in pending_jobs(config, done, BatchSummary()))


def _result(job: Job, completion) -> dict:
    usage = completion.usage
    result = {
        "id": job.id,
        "text": completion.text,
        "finish_reason": completion.finish_reason,
        "usage": {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "time_to_first_token_s": round(usage.time_to_first_token_s, 6),
        },
    }
    if completion.logprobs:
        result["logprobs"] = completion.logprobs
    return result


async def run_batch(client: AsyncClient, config: BatchConfig) -> BatchSummary:
    """Runs the job's pending lines with bounded concurrency, appending results as they finish."""
    summary = BatchSummary()
    done = written_ids(config.output, config.retry_failed)
    total = count_pending(config, done)
    jobs = pending_jobs(config, done, summary)
    bar = tqdm(total=total, unit="req", disable=None if config.progress else True, file=sys.stderr, dynamic_ncols=True)
    start = time.monotonic()

    with open(config.output, "a", encoding="utf-8") as out:

        def write(record: dict) -> None:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()  # a whole line at a time: an interrupt never leaves half a line

        async def answer(job: Job) -> None:
            if job.error is None:
                try:
                    completion = await client.generate(job.prompt, **job.params)
                except ShardgateError as error:
                    record = {"id": job.id, "error": {"code": error.code().name, "message": error.details()}}
                except (TypeError, ValueError) as error:  # a parameter of the wrong type
                    record = {"id": job.id, "error": {"code": "INVALID_ARGUMENT", "message": str(error)}}
                else:
                    record = _result(job, completion)
                    summary.completion_tokens += completion.usage.completion_tokens
            else:
                record = {"id": job.id, "error": {"code": "INVALID_ARGUMENT", "message": job.error}}
            write(record)
            if "error" in record:
                summary.failed += 1
            else:
                summary.done += 1
            bar.update(1)
            bar.set_postfix(
                failed=summary.failed,
                tokens_per_s=f"{summary.completion_tokens / max(time.monotonic() - start, 1e-9):.0f}",
                refresh=False,
            )

        # Ctrl-C and SIGTERM stop cleanly, to resume later. Handled here rather than left to
        # asyncio.run, which does nothing when SIGINT was ignored at start (a shell's background job).
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, asyncio.current_task().cancel)
        try:
            await closed_loop(jobs, config.concurrency, answer)  # jobs is read lazily, each job once
        except asyncio.CancelledError:
            summary.interrupted = True
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
            summary.elapsed_s = time.monotonic() - start
            bar.close()
    return summary
