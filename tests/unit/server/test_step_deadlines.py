"""Step deadlines follow the measured time of steps of the same shape, within a floor and a ceiling."""

import pytest

from shardgate.server.step_deadlines import DECODE, EMBED, PREFILL, CallShape, StepDeadlines


def deadlines() -> StepDeadlines:
    return StepDeadlines(ceiling_s=60, multiple=8, floor_s=2)


def test_a_shape_nothing_is_known_of_gets_the_ceiling_per_forward():
    assert deadlines().timeout(CallShape(DECODE, 4)) == 60
    assert deadlines().timeout(CallShape(DECODE, 4, forwards=4)) == 240


def test_the_deadline_is_a_multiple_of_the_average_per_forward_between_floor_and_ceiling():
    d = deadlines()
    d.record(CallShape(PREFILL, 512), 1.0)
    assert d.timeout(CallShape(PREFILL, 300)) == 8.0  # the same bucket (512): 8 × 1 s
    d.record(CallShape(DECODE, 8, forwards=4), 0.2)  # 0.05 s per forward
    assert d.timeout(CallShape(DECODE, 8, forwards=4)) == 2  # 8 × 0.05 × 4 = 1.6 s: the floor
    assert d.timeout(CallShape(DECODE, 8, forwards=16)) == pytest.approx(6.4)  # scales with the forwards run
    d.record(CallShape(PREFILL, 2048), 20.0)
    assert d.timeout(CallShape(PREFILL, 2048)) == 60  # 160 s: the ceiling


def test_the_average_moves_toward_new_times():
    d = StepDeadlines(ceiling_s=600, multiple=1, floor_s=0.001, smoothing=0.5)
    shape = CallShape(DECODE, 1)
    d.record(shape, 1.0)
    d.record(shape, 3.0)
    assert d.expected(shape) == 2.0


def test_an_unseen_class_borrows_from_its_neighbours():
    d = deadlines()
    d.record(CallShape(PREFILL, 64), 0.5)
    d.record(CallShape(PREFILL, 1024), 4.0)
    assert d.expected(CallShape(PREFILL, 100)) == 4.0  # the nearest larger bucket's time (more tokens are never faster)
    assert d.expected(CallShape(PREFILL, 2048)) == 8.0  # past the largest known: scaled by tokens
    assert d.expected(CallShape(DECODE, 16)) == 0.5  # a new kind: the other kinds' times
    d.record(CallShape(EMBED, 16), 0.1)
    assert d.expected(CallShape(EMBED, 1)) == 0.1 and d.expected(CallShape(EMBED, 64)) == pytest.approx(0.4)


@pytest.mark.parametrize("tokens, bucket", [(1, 1), (2, 2), (3, 4), (64, 64), (65, 128)])
def test_classes_are_powers_of_two_of_tokens(tokens, bucket):
    assert CallShape(DECODE, tokens).bucket == bucket
