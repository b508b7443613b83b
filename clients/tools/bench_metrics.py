"""Per-request timings of a benchmark run and their summary (throughput, latency percentiles, cost)."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """One request as the load generator saw it (perf_counter seconds)."""

    start: float
    prompt_tokens: int
    token_times: list[float] = field(default_factory=list)
    """When each output token arrived."""
    end: float = 0.0
    error: str | None = None
    """Status code name when the request failed."""

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.start if self.token_times else None

    def inter_token_latencies(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    @property
    def time_per_output_token(self) -> float | None:
        """Mean time between its tokens after the first (None with fewer than two): unlike the
        gaps themselves, it does not depend on how tokens were grouped into messages."""
        if len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)


def percentile(values: list[float], q: int) -> float:
    """The q-th percentile (q in 1..99) by linear interpolation between the closest ranks (rank
    (n - 1) × q / 100 of the sorted values: statistics' "inclusive" method, numpy's "linear");
    nan for no values."""
    if not values:
        return math.nan
    if len(values) == 1:  # statistics.quantiles wants two values before Python 3.13
        return float(values[0])
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


@dataclass(frozen=True)
class Summary:
    """What a run achieved. Latencies in milliseconds."""

    requests: int
    errors: int
    duration_s: float
    output_tokens: int
    output_tokens_per_s: float
    requests_per_s: float
    ttft_ms: dict[str, float]
    itl_ms: dict[str, float]
    tpot_ms: dict[str, float]
    """Time per output token of each request, after its first."""
    e2e_ms: dict[str, float]
    cost_per_million_tokens: float | None
    """Price of the device-time per million output tokens (None without a price)."""

    def as_dict(self) -> dict:
        return asdict(self)


def _percentiles_ms(values: list[float]) -> dict[str, float]:
    return {f"p{q}": percentile(values, q) * 1000 for q in PERCENTILES}


def summarize(records: list[RequestRecord], device_cost_per_hour: float = 0.0, devices: int = 1) -> Summary:
    """Throughput over the whole run (first start to last end); latencies over the requests
    that succeeded; cost = device-hours used × price ÷ output tokens."""
    ok = [r for r in records if r.error is None]
    duration = max(r.end for r in records) - min(r.start for r in records)
    tokens = sum(len(r.token_times) for r in ok)
    cost = None
    if device_cost_per_hour > 0 and tokens > 0:
        cost = device_cost_per_hour * devices * duration / 3600 / tokens * 1e6
    return Summary(
        requests=len(records),
        errors=len(records) - len(ok),
        duration_s=duration,
        output_tokens=tokens,
        output_tokens_per_s=tokens / duration if duration > 0 else math.nan,
        requests_per_s=len(ok) / duration if duration > 0 else math.nan,
        ttft_ms=_percentiles_ms([r.ttft for r in ok if r.ttft is not None]),
        itl_ms=_percentiles_ms([gap for r in ok for gap in r.inter_token_latencies()]),
        tpot_ms=_percentiles_ms([r.time_per_output_token for r in ok if r.time_per_output_token is not None]),
        e2e_ms=_percentiles_ms([r.end - r.start for r in ok]),
        cost_per_million_tokens=cost,
    )
