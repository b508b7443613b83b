"""Request latencies and step shapes derived from the scheduler's records."""

import pytest

from shardgate.server.measures import RequestTimes, StepShape
from shardgate.server.request import Request, SamplingParams
from shardgate.server.scheduler import ScheduledChunk, StepPlan

PARAMS = SamplingParams(8, 0.0, 1.0, 0, 0, False, False)


def request(prompt_len=4, outputs=0, **times) -> Request:
    r = Request(1, "r", [1] * prompt_len, PARAMS, **times)
    r.output_ids = [7] * outputs
    return r


def test_times_of_a_finished_request():
    r = request(outputs=5, arrival=10.0)
    r.first_scheduled, r.first_token, r.finished_at = 10.5, 11.0, 13.0
    times = RequestTimes.of(r, now=99.0)
    assert (times.duration_s, times.queue_s, times.ttft_s) == (3.0, 0.5, 1.0)
    assert times.tpot_s == pytest.approx(0.5)  # 4 tokens after the first in 2 s


def test_times_of_a_request_that_never_ran():
    times = RequestTimes.of(request(arrival=10.0), now=12.0)  # still waiting (e.g. being cancelled)
    assert (times.duration_s, times.queue_s, times.ttft_s, times.tpot_s) == (2.0, None, None, None)


def test_one_token_has_no_time_per_output_token():
    r = request(outputs=1, arrival=0.0)
    r.first_scheduled, r.first_token, r.finished_at = 0.1, 0.2, 0.2
    assert RequestTimes.of(r, now=1.0).tpot_s is None


def chunk(r: Request, start: int, n: int) -> ScheduledChunk:
    return ScheduledChunk(r, start, n, [], True, False)


@pytest.mark.parametrize(
    "chunks, phase, prefill_tokens, decode_tokens",
    [
        ([(4, 0, 0, 4)], "prefill", 4, 0),
        ([(4, 1, 4, 1), (4, 3, 6, 1)], "decode", 0, 2),
        ([(4, 1, 4, 1), (9, 0, 0, 5)], "mixed", 5, 1),
        ([(4, 2, 0, 6)], "prefill", 6, 0),  # a preempted request recomputes prompt and outputs
    ],
)
def test_step_shape(chunks, phase, prefill_tokens, decode_tokens):
    plan = StepPlan(1, [chunk(request(p, outputs), start, n) for p, outputs, start, n in chunks])
    shape = StepShape.of(plan)
    assert (shape.phase, shape.prefill_tokens, shape.decode_tokens) == (phase, prefill_tokens, decode_tokens)
    assert shape.batch_size == len(chunks) and shape.tokens == prefill_tokens + decode_tokens
