"""Step device time shared among requests by tokens; prices."""

import pytest

from shardgate.server.cost import price, share_device_time
from shardgate.server.request import Request, SamplingParams
from shardgate.server.scheduler import ScheduledChunk, StepPlan

PARAMS = SamplingParams(8, 0.0, 1.0, 0, 0, False, False)


def chunk(request: Request, num_tokens: int) -> ScheduledChunk:
    return ScheduledChunk(request, 0, num_tokens, [], True, False)


def test_a_step_is_shared_by_tokens_and_adds_up():
    prefill, decode_a, decode_b = (Request(i, f"r{i}", [1] * 6, PARAMS) for i in range(3))
    decode_a.device_seconds = 1.0  # earlier steps
    plan = StepPlan(1, [chunk(prefill, 6), chunk(decode_a, 1), chunk(decode_b, 1)])
    share_device_time(plan, 1.6)  # e.g. 0.8 s of wall time on two devices
    assert prefill.device_seconds == pytest.approx(1.2)
    assert decode_a.device_seconds == pytest.approx(1.0 + 0.2)
    assert decode_b.device_seconds == pytest.approx(0.2)


def test_price_per_device_hour():
    assert price(7200.0, 3.5) == pytest.approx(7.0)
    assert price(1.0, 0.0) == 0.0
