"""The driver's one gateway session."""

from shardgate.shards.link import SessionGate


def test_one_session_at_a_time_and_only_its_id_is_admitted():
    gate = SessionGate()
    assert not gate.admits(None) and not gate.admits("")
    first = gate.open()
    assert first and gate.open() is None
    assert gate.admits(first) and not gate.admits(first[:-1] + "x") and not gate.admits(None)
    gate.close("someone-else")  # only the session's own end closes it
    assert gate.admits(first)
    gate.close(first)
    assert not gate.admits(first)
    second = gate.open()
    assert second and second != first
