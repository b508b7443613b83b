"""The driver's main thread: calls from handler threads, heartbeats while idle, and stopping once
a call leaves the ranks out of step; and what SIGTERM does to the gateway's session."""

import threading
import time

import pytest

from shardgate.proto import shard_pb2
from shardgate.proto.shard_config import BatchLimits
from shardgate.shards.driver import DriverStopping, MainThread, ShardService, keepalive_interval
from shardgate.shards.link import SessionGate


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


class FakeContext:
    """The gRPC servicer context of one Attach call."""

    def __init__(self) -> None:
        self.callbacks = []
        self.aborted = None

    def add_callback(self, callback) -> bool:
        self.callbacks.append(callback)
        return True

    def peer(self) -> str:
        return "unix:"

    def abort(self, code, details):
        self.aborted = (code, details)
        raise RuntimeError(details)

    def end(self) -> None:
        for callback in self.callbacks:
            callback()


class ForgettingExecutor:
    def forget_all(self) -> None:
        pass


def attach_service() -> tuple[ShardService, MainThread, threading.Thread]:
    main = MainThread()
    thread, _ = serve_in_thread(main)
    description = shard_pb2.DescribeResponse(num_kv_blocks=8, block_size=4, limits=BatchLimits().to_message())
    return ShardService(ForgettingExecutor(), description, main, SessionGate()), main, thread


def test_sigterm_is_told_on_the_open_session_and_the_driver_waits_until_the_gateway_lets_go():
    service, main, thread = attach_service()
    context = FakeContext()
    messages = service.Attach(shard_pb2.AttachRequest(), context)
    assert next(messages).session_id
    told = []
    reader = threading.Thread(target=lambda: told.extend(messages))  # blocks until the notice, then until the session ends
    reader.start()
    assert not service.stop_notice.wait_sessions_ended(0.05)  # a session is open
    service.stop_notice.request()
    deadline = time.monotonic() + 5
    while not told and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [message.stopping for message in told] == [True] and reader.is_alive()
    step = shard_pb2.StepRequest(chunks=[shard_pb2.SeqChunk(seq_id=1, token_ids=[1], sampling=shard_pb2.Sampling())])
    with pytest.raises(DriverStopping, match="takes no new sequences"):  # a ValueError: the driver keeps serving
        main.call(service._step, step, None)
    later = FakeContext()
    with pytest.raises(RuntimeError, match="takes no new session"):
        next(service.Attach(shard_pb2.AttachRequest(), later))
    context.end()  # the gateway moved its generations and closed the session
    assert service.stop_notice.wait_sessions_ended(5)
    reader.join(5)
    main.stop()
    thread.join(5)
