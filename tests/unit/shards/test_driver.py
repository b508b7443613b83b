"""The driver's main thread: calls from handler threads, heartbeats while idle, and stopping once
a call leaves the ranks out of step."""

import threading

import pytest

from shardgate.shards.driver import MainThread, keepalive_interval


def serve_in_thread(main: MainThread) -> tuple[threading.Thread, list[BaseException]]:
    raised: list[BaseException] = []

    def run() -> None:
        try:
            main.serve()
        except BaseException as error:
            raised.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, raised


def test_an_idle_main_thread_runs_its_heartbeat_and_still_takes_calls():
    beats = threading.Semaphore(0)
    main = MainThread(idle=beats.release, idle_interval_s=0.01)
    thread, raised = serve_in_thread(main)
    for _ in range(3):
        assert beats.acquire(timeout=5)
    assert main.call(lambda x: x + 1, 41) == 42
    main.stop()
    thread.join(5)
    assert not thread.is_alive() and not raised


def test_a_rejected_plan_keeps_serving_but_any_other_error_stops_the_main_thread():
    main = MainThread()
    thread, raised = serve_in_thread(main)

    def reject():
        raise ValueError("bad plan")

    def break_down():
        raise RuntimeError("a rank stopped answering")

    with pytest.raises(ValueError):
        main.call(reject)
    assert main.call(lambda: "still serving") == "still serving"
    with pytest.raises(RuntimeError):
        main.call(break_down)
    thread.join(5)
    assert not thread.is_alive() and isinstance(raised[0], RuntimeError)
    with pytest.raises(RuntimeError, match="the driver is stopping after RuntimeError: a rank stopped answering"):
        main.call(lambda: "too late")  # refused, not left waiting


def test_idle_heartbeats_come_well_within_the_collective_timeout():
    assert keepalive_interval(60) == 5 and keepalive_interval(8) == 2
