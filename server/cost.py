"""What each request costs: the replica's device time, shared among the requests of each step.

A step occupies every device of its replica for its wall time, so it costs wall time × device
count. That is shared among the step's requests in proportion to the tokens each computed in
it: a prefill chunk of 500 tokens pays 500 times what a decode token pays.
"""

from __future__ import annotations

from shardgate.server.scheduler import StepPlan

SECONDS_PER_HOUR = 3600.0


def share_device_time(plan: StepPlan, device_seconds: float) -> None:
    """Adds each request's share of a step's device time to its `device_seconds`."""
    total = plan.num_tokens
    for chunk in plan.chunks:
        chunk.request.device_seconds += device_seconds * chunk.num_tokens / total


def price(device_seconds: float, cost_per_device_hour: float) -> float:
    """The cost of device time at a price per device-hour."""
    return device_seconds * cost_per_device_hour / SECONDS_PER_HOUR
