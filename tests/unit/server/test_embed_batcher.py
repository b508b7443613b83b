"""The dynamic batcher's rules: full, preferred size, queue delay, priorities, deadlines."""

import grpc
import pytest

from shardgate.server.config import EmbedBatcherConfig
from shardgate.server.embed_batcher import DynamicBatcher, EmbedJob, Pooling

T0 = 1000.0
DELAY_US = 5000


def job(inputs: int = 1, arrival: float = T0, priority: int = 0, deadline: float | None = None) -> EmbedJob:
    return EmbedJob("r", [[1, 2, 3]] * inputs, Pooling.MEAN, False, priority, deadline, arrival)


def batcher(max_batch_size=8, preferred=(), delay_us=DELAY_US) -> DynamicBatcher:
    config = EmbedBatcherConfig(
        max_batch_size=max_batch_size, max_queue_delay_us=delay_us, preferred_batch_sizes=preferred, max_inputs=min(4, max_batch_size)
    )
    return DynamicBatcher(config, aging_s=1.0)


def test_partial_batch_waits_for_the_delay_of_its_oldest_call():
    b = batcher()
    first, second = job(arrival=T0), job(arrival=T0 + 0.004)
    b.submit(first)
    b.submit(second)
    assert b.take(T0 + 0.001) == [] and b.seconds_until_ready(T0 + 0.001) == pytest.approx(0.004)
    assert b.take(T0 + 0.005) == [first, second] and b.num_queued_requests == 0
    assert b.seconds_until_ready(T0 + 0.005) is None


def test_full_batch_runs_at_once_and_never_splits_a_call():
    b = batcher(max_batch_size=8)
    jobs = [job(inputs=3, arrival=T0 + i * 1e-4) for i in range(3)]  # 3 + 3 + 3 > 8
    for j in jobs:
        b.submit(j)
    assert b.take(T0 + 0.001) == jobs[:2]  # the third does not fit: the batch is full at 6 inputs
    assert b.take(T0 + 0.001) == []  # the rest waits for its delay
    exact = batcher(max_batch_size=4)
    calls = [job(inputs=2), job(inputs=2)]
    for j in calls:
        exact.submit(j)
    assert exact.take(T0) == calls


def test_preferred_size_runs_at_once_as_the_longest_preferred_prefix():
    b = batcher(max_batch_size=16, preferred=(2, 4))
    jobs = [job(arrival=T0 + i * 1e-4) for i in range(5)]
    b.submit(jobs[0])
    assert b.take(T0 + 0.001) == []  # 1 input: not preferred, not full, not late
    for j in jobs[1:]:
        b.submit(j)
    assert b.take(T0 + 0.001) == jobs[:4]  # 5 queued: the longest preferred prefix is 4
    assert b.take(T0 + 0.001) == [] and b.take(T0 + 0.006) == [jobs[4]]


def test_priority_orders_the_queue_fifo_within_a_level():
    b = batcher(max_batch_size=2, delay_us=0)
    low, high, high_later = job(arrival=T0), job(arrival=T0 + 0.1, priority=1), job(arrival=T0 + 0.2, priority=1)
    for j in (low, high, high_later):
        b.submit(j)
    assert b.take(T0 + 0.3) == [high, high_later] and b.take(T0 + 0.3) == [low]


def test_expired_call_is_dropped_with_deadline_exceeded():
    b = batcher()
    late, ok = job(deadline=T0 + 0.002), job(arrival=T0 + 0.001)
    b.submit(late)
    b.submit(ok)
    assert b.seconds_until_ready(T0) == pytest.approx(0.002)  # wakes the engine at the deadline, before the delay
    assert b.take(T0 + 0.01) == [ok]
    assert late.done and late.error[0] == grpc.StatusCode.DEADLINE_EXCEEDED and late.pending_inputs() == [0]


def test_cancel_removes_a_queued_call_and_ends_it():
    b = batcher()
    j = job()
    b.submit(j)
    assert b.num_queued_requests == 1 and b.num_queued_tokens == 3
    b.cancel(j)
    assert b.num_queued_requests == 0 and j.done and j.error[0] == grpc.StatusCode.CANCELLED


def test_listeners_hear_every_submit():
    b = batcher()
    heard = []
    b.add_listener(lambda: heard.append(1))
    b.submit(job())
    b.submit(job())
    assert heard == [1, 1]


def test_config_rejects_preferred_sizes_and_inputs_over_the_max():
    with pytest.raises(ValueError, match="preferred"):
        EmbedBatcherConfig(max_batch_size=4, preferred_batch_sizes=(8,))
    with pytest.raises(ValueError, match="max_inputs"):
        EmbedBatcherConfig(max_batch_size=4, max_inputs=5)
