"""Admission bounds: each one refuses with RESOURCE_EXHAUSTED naming itself, and tickets count exactly."""

import grpc
import pytest

from shardgate.server.admission import Admission, QueueLoad
from shardgate.server.config import AdmissionConfig
from shardgate.server.validation import RequestError


def admission(queue: QueueLoad | None = None, **bounds) -> Admission:
    queue = queue or QueueLoad(0, 0)
    return Admission(AdmissionConfig(**bounds), lambda: queue)


@pytest.mark.parametrize(
    "bounds, queue, tokens, bound",
    [
        (dict(max_queue_requests=3), QueueLoad(3, 10), 1, "max_queue_requests"),
        (dict(max_queue_tokens=100), QueueLoad(1, 90), 11, "max_queue_tokens"),
    ],
)
def test_queue_bounds_refuse_naming_the_bound(bounds, queue, tokens, bound):
    with pytest.raises(RequestError) as raised:
        admission(queue, **bounds).admit(tokens)
    assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    flag = "--" + bound.replace("_", "-")
    assert str(raised.value).startswith(f"{bound}: ") and flag in str(raised.value)


def test_queue_bounds_admit_up_to_the_limit():
    gate = admission(QueueLoad(2, 90), max_queue_requests=3, max_queue_tokens=100)
    ticket = gate.admit(10)  # 2 < 3 queued requests, 90 + 10 tokens == the bound: admitted
    assert gate.active == 1
    ticket.release()
    assert gate.active == 0
    with pytest.raises(RequestError, match="^max_queue_tokens: "):
        gate.admit(11)  # one token more is over
    assert gate.active == 0  # a refused request is not counted


def test_concurrency_bound_counts_tickets_until_released():
    gate = admission(max_concurrent_requests=2)
    first, second = gate.admit(1), gate.admit(1)
    with pytest.raises(RequestError, match="^max_concurrent_requests: 2 requests in progress"):
        gate.admit(1)
    first.release()
    first.release()  # idempotent
    assert gate.active == 1
    gate.admit(1)
    assert gate.active == 2
    second.release()
    assert gate.active == 1


def test_a_keys_quota_refuses_its_extra_requests_naming_the_quota_not_the_key():
    gate = admission(max_concurrent_requests=10, max_concurrent_requests_per_key=2)
    first, _ = gate.admit(1, "tenant-a"), gate.admit(1, "tenant-a")
    with pytest.raises(RequestError) as raised:
        gate.admit(1, "tenant-a")
    assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(raised.value).startswith("max_concurrent_requests_per_key: ") and "tenant-a" not in str(raised.value)
    gate.admit(1, "tenant-b")  # another key has its own quota
    gate.admit(1)  # no key (a server without API keys): no quota
    first.release()
    gate.admit(1, "tenant-a")
    assert gate.active == 4 and gate.active_by_tenant == {"tenant-a": 2, "tenant-b": 1}
