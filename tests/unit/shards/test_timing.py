"""Communication timing of a step: collectives add their time only when a timer is set."""

import pytest
import torch

from shardgate.shards import parallel as parallel_module
from shardgate.shards import timing as timing_module
from shardgate.shards.parallel import TensorParallel
from shardgate.shards.timing import CommTimer


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock_and_collectives(monkeypatch):
    """A clock that moves only when a (fake) collective runs: 0.25 s per all-reduce, 0.5 s per all-gather."""
    clock = FakeClock()

    def all_reduce(x, group):
        clock.now += 0.25

    def all_gather(parts, x, group):
        clock.now += 0.5
        for part in parts:
            part.copy_(x)

    monkeypatch.setattr(timing_module.time, "perf_counter", clock)
    monkeypatch.setattr(parallel_module.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(parallel_module.dist, "all_gather", all_gather)
    return clock


def test_collectives_add_their_time_to_the_timer(clock_and_collectives):
    tp = TensorParallel(0, 2, group=object())
    tp.timer = timer = CommTimer(torch.device("cpu"))
    tp.all_reduce(torch.ones(2))
    tp.all_reduce(torch.ones(2))
    assert tp.all_gather(torch.ones(1, 3)).shape == (1, 6)
    with timer.measure("pp_recv"):
        clock_and_collectives.now += 2.0
    timer.finish()
    assert timer.seconds == {"all_reduce": 0.5, "all_gather": 0.5, "pp_send": 0.0, "pp_recv": 2.0}
    assert timer.counts == {"all_reduce": 2, "all_gather": 1, "pp_send": 0, "pp_recv": 1}


def test_without_a_timer_nothing_is_timed(clock_and_collectives):
    tp = TensorParallel(0, 2, group=object())
    tp.all_reduce(torch.ones(2))
    assert tp.timer is None and clock_and_collectives.now == 100.25


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_work_is_timed_with_events_when_the_step_finishes():
    timer = CommTimer(torch.device("cuda"))
    x = torch.randn(4096, 4096, device="cuda")
    with timer.measure("all_reduce"):  # stands in for a collective: work queued on the stream
        for _ in range(20):
            x = x @ x / 4096
    assert timer.seconds["all_reduce"] == 0.0  # nothing read until the step's end
    timer.finish()
    elapsed = timer.seconds["all_reduce"]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        x = x @ x / 4096
    end.record()
    torch.cuda.synchronize()
    assert elapsed == pytest.approx(start.elapsed_time(end) / 1000, rel=0.5) and timer.counts["all_reduce"] == 1
