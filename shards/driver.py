"""The driver (rank 0) serving the gateway: its gRPC service, the only door into the replica,
and the server it runs on. Steps run on the process's main thread (MainThread).

The door is guarded (shards/link.py): on a TCP address, mutual TLS or a shared token (or an
explicit --insecure-listen); one gateway session at a time; and every plan is checked
(shards/plan_check.py) before it reaches a rank. A unix socket is made readable and writable by
its owner only, and removed when the gateway that started the driver dies (main.watch_parent).

SIGTERM (a spot node being reclaimed) does not stop the driver at once while a gateway session
is open: the driver tells the gateway on the session's Attach call, takes no new sequences or
sessions, lets the gateway move its generations off at its next step boundary, and stops once
the gateway has ended the session (StopNotice), or after STOP_GRACE_S."""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import Future
from typing import TypeVar

import grpc

from shardgate.proto import shard_pb2, shard_pb2_grpc
from shardgate.proto.common import INTERNAL_MESSAGE_BYTES
from shardgate.proto.link_auth import read_token
from shardgate.proto.secret_files import host_of, is_loopback, readable_by_others
from shardgate.proto.shard_config import BatchLimits, ShardConfig
from shardgate.proto.tls import server_credentials
from shardgate.proto.tracing import extract_metadata
from shardgate.shards.executor import StepExecutor
from shardgate.shards.link import LinkGuard, SessionGate
from shardgate.shards.plan_check import PlanError, PlanLimits, check_embed, check_step

log = logging.getLogger("shardgate.shard")
T = TypeVar("T")
ANSWER_GRACE_S = 1.0
"""Seconds a failing driver gives the gateway's call to receive its error before stopping."""
STOP_GRACE_S = 25.0
"""Seconds a driver that got SIGTERM waits for the gateway to move its generations and end the
session before it stops anyway (within Kubernetes' default 30 s termination grace)."""

# A gateway whose connection vanished without a reset (its host lost) is found by these pings,
# and its session ends, so that another gateway can attach.
KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
]
# The session's Attach call holds a worker thread for its whole life; the others answer the
# session's calls (one at a time) and refuse anyone else's at once.
WORKERS = 4


class MainThread:
    """Runs the model's work on the process's main thread, which gRPC's handler threads hand it
    to: the thread that loaded and warmed up the model, whose OpenMP team torch's intra-op
    parallelism uses (a handler thread would run CPU steps on fewer cores).

    While no call comes for `idle_interval_s`, it runs `idle()` (the ranks' heartbeat: the other
    ranks wait for the driver in a collective, which would otherwise time out on an idle replica)."""

    def __init__(self, idle: Callable[[], object] | None = None, idle_interval_s: float | None = None) -> None:
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = idle
        self._idle_interval_s = idle_interval_s if idle is not None else None
        self._stopped_by: BaseException | None = None
        """What ended serve(), when something did: later calls get an error, not a wait forever."""

    def call(self, function: Callable[..., T], *args) -> T:
        """Runs function(*args) on the main thread; returns its result or raises its exception."""
        return self.submit(function, *args).result()

    def submit(self, function: Callable[..., T], *args) -> Future:
        """Queues function(*args) for the main thread (calls run in the order queued); the
        future holds its result or its exception."""
        future: Future = Future()
        self._calls.put((function, args, future))
        if self._stopped_by is not None:
            self._refuse_queued()
        return future

    def serve(self) -> None:
        """The main thread: run calls until stop(). A call that raises anything but ValueError (a
        plan every rank rejects alike, before any collective) may leave the ranks out of step: its
        caller gets the exception, and serve() raises it too, as it does one of idle()."""
        try:
            self._serve()
        except BaseException as error:
            self._stopped_by = error
            self._refuse_queued()
            raise

    def _serve(self) -> None:
        while True:
            try:
                item = self._calls.get(timeout=self._idle_interval_s)
            except queue.Empty:
                self._idle()
                continue
            if item is None:
                return
            function, args, future = item
            try:
                future.set_result(function(*args))
            except ValueError as error:
                future.set_exception(error)
            except BaseException as error:  # handed to the caller, which raises it; then the driver stops
                future.set_exception(error)
                raise

    def _refuse_queued(self) -> None:
        while True:
            try:
                item = self._calls.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item[2].set_exception(RuntimeError(f"the driver is stopping after {type(self._stopped_by).__name__}: {self._stopped_by}"))

    def stop(self) -> None:
        self._calls.put(None)


class DriverStopping(ValueError):
    """A step that adds a sequence after SIGTERM: refused (ABORTED), nothing run; the replica stays in step."""


class StopNotice:
    """SIGTERM on the driver (a spot or preemptible node being reclaimed), as the gateway sees
    it: the session's Attach call says so at once, even on an idle replica; new sequences and new
    sessions are refused; steps of the sequences the replica holds still run, so the gateway can
    move them at its next step boundary; the driver stops once the session has ended (the gateway
    let go), or after a bounded wait."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self.requested = False
        self._sessions = 0
        """Attach calls open (at most one is past the session gate)."""

    def request(self) -> None:
        with self._changed:
            self.requested = True
            self._changed.notify_all()

    def opened(self) -> None:
        with self._changed:
            self._sessions += 1

    def closed(self) -> None:
        with self._changed:
            self._sessions -= 1
            self._changed.notify_all()

    def changed(self) -> None:
        """Wakes the waiters (a session's call ended)."""
        with self._changed:
            self._changed.notify_all()

    def wait(self, done: Callable[[], bool], timeout: float | None = None) -> bool:
        """Waits until done() holds (checked whenever something changes); False on timeout."""
        with self._changed:
            return self._changed.wait_for(done, timeout)

    def wait_sessions_ended(self, timeout: float) -> bool:
        return self.wait(lambda: self._sessions == 0, timeout)


class StepOrder:
    """Queues steps for the main thread in the order the gateway sent them. With async
    scheduling the gateway sends a step while the one before it still runs, naming that one
    (StepRequest.after_step_id); the two calls reach their handler threads in either order, so
    the later one waits here until the earlier one is queued."""

    def __init__(self) -> None:
        self._queued = threading.Condition()
        self._last: int | None = None
        """step_id of the step queued last."""

    def queue(self, request: shard_pb2.StepRequest, context, submit: Callable[[], Future]) -> Future:
        """Runs submit() once the step `request` follows is queued; raises ValueError when that
        step does not come within the call's deadline, or the call ends first."""
        after = request.after_step_id

        def wake() -> None:
            with self._queued:
                self._queued.notify_all()

        if after and not context.add_callback(wake):
            raise ValueError(f"step {request.step_id}: the call ended")
        with self._queued:
            if after and not self._queued.wait_for(lambda: self._last == after or not context.is_active(), context.time_remaining()):
                raise ValueError(f"step {request.step_id} follows step {after}, which did not reach the driver in time")
            if after and self._last != after:
                raise ValueError(f"step {request.step_id}: the call ended before step {after} reached the driver")
            future = submit()
            self._last = request.step_id
            self._queued.notify_all()
        return future


class ShardService(shard_pb2_grpc.ShardServicer):
    """Attach opens the one gateway session; Describe answers the description made at start;
    Step and Embed are checked, then run on the main thread, one at a time, as Heartbeat does;
    steps in the order the gateway sent them (StepOrder: it may send a step while the one before
    still runs)."""

    def __init__(
        self, executor: StepExecutor, description: shard_pb2.DescribeResponse, main_thread: MainThread, sessions: SessionGate
    ) -> None:
        self.executor = executor
        self.description = description
        self.main_thread = main_thread
        self.sessions = sessions
        self.limits = PlanLimits.of(description, BatchLimits.from_message(description.limits))
        self.stop_notice = StopNotice()
        self.order = StepOrder()

    def Attach(self, request, context):
        if self.stop_notice.requested:
            context.abort(grpc.StatusCode.UNAVAILABLE, "this driver is stopping (SIGTERM): it takes no new session")
        session = self.sessions.open()
        if session is None:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this driver serves another gateway's session (one at a time); it ends when that gateway disconnects",
            )
        ended = threading.Event()
        notice = self.stop_notice
        notice.opened()
        try:
            if not context.add_callback(lambda: (ended.set(), notice.changed())):
                return  # the call has ended already
            self.main_thread.call(self.executor.forget_all)  # nothing of an earlier session's sequences
            log.info("gateway session opened by %s", context.peer())
            yield shard_pb2.AttachResponse(session_id=session)
            notice.wait(lambda: ended.is_set() or notice.requested)
            if not ended.is_set():
                log.info("telling the gateway that this driver is stopping (SIGTERM)")
                yield shard_pb2.AttachResponse(stopping=True)
                ended.wait()
        finally:
            self.sessions.close(session)
            notice.closed()
            log.info("gateway session of %s ended", context.peer())

    def Describe(self, request, context) -> shard_pb2.DescribeResponse:
        return self.description

    def Step(self, request: shard_pb2.StepRequest, context) -> shard_pb2.StepResponse:
        # The gateway's step span, when it traces this step and this process exports spans.
        parent = extract_metadata(context.invocation_metadata()) if self.executor.tracer is not None else None
        try:
            return self.order.queue(request, context, lambda: self.main_thread.submit(self._step, request, parent)).result()
        except PlanError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except DriverStopping as error:
            context.abort(grpc.StatusCode.ABORTED, str(error))
        except ValueError as error:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))

    def Embed(self, request: shard_pb2.EmbedStepRequest, context) -> shard_pb2.EmbedStepResponse:
        try:
            check_embed(request, self.limits)
            return self.main_thread.call(self.executor.embed, request)
        except PlanError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except ValueError as error:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))

    def Heartbeat(self, request: shard_pb2.HeartbeatRequest, context) -> shard_pb2.HeartbeatResponse:
        return shard_pb2.HeartbeatResponse(ranks=self.main_thread.call(self.executor.heartbeat))

    def _step(self, request: shard_pb2.StepRequest, parent) -> shard_pb2.StepResponse:
        """On the main thread, where the sequence table the check reads is only ever changed."""
        if self.stop_notice.requested and any(chunk.HasField("sampling") for chunk in request.chunks):
            raise DriverStopping("this driver is stopping (SIGTERM): it takes no new sequences")
        check_step(request, self.executor.sequences, self.limits)
        return self.executor.run(request, parent)


def link_token(config: ShardConfig) -> str | None:
    """The token every call must carry (None when the driver has none); raises ValueError
    naming the flag when its file cannot serve. Logs, once, what an operator should know of the
    link: a token file others can read, a token that crosses the network in the clear, a port
    open to anyone (--insecure-listen)."""
    token = read_token(config.listen_token_file, "--listen-token-file") if config.listen_token_file else None
    if token is not None and (warning := readable_by_others(config.listen_token_file, "--listen-token-file")):
        log.warning(warning)
    if config.listens_on_tcp and not config.tls_cert:
        if token is None:
            log.warning(
                "--insecure-listen: the driver on %s serves anyone who can reach it (reads and writes the KV cache, runs steps); "
                "give it mutual TLS or --listen-token-file",
                config.listen,
            )
        elif not is_loopback(host_of(config.listen)):
            log.warning("--listen %s has a token but no TLS: the token crosses the network in the clear (add --tls-*)", config.listen)
    return token


def unix_socket_path(listen: str) -> str | None:
    """The file of a `unix:PATH` / `unix:///PATH` address; None for a TCP one."""
    if not listen.startswith("unix:"):
        return None
    path = listen.removeprefix("unix:")
    return "/" + path.lstrip("/") if path.startswith("//") else path


def _listen(server: grpc.Server, config: ShardConfig) -> int:
    """Binds the driver's address: mutual TLS when certificates are given (across hosts); a unix
    socket is created readable and writable by its owner only."""
    if config.tls_cert:
        return server.add_secure_port(config.listen, server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca))
    if unix_socket_path(config.listen) is None:
        return server.add_insecure_port(config.listen)
    previous = os.umask(0o177)
    try:
        return server.add_insecure_port(config.listen)
    finally:
        os.umask(previous)


def serve(executor: StepExecutor, description: shard_pb2.DescribeResponse, config: ShardConfig, token: str | None) -> bool:
    """Serves the gateway on config.listen until SIGTERM (and the gateway letting go of its
    session: StopNotice), running steps on this (the main) thread; calls must carry `token`
    when it is not None. False when the address cannot be bound. Raises what a step, an
    embedding batch or a heartbeat raised that leaves the ranks out of step (a rank that failed
    or stopped answering), after the gateway got it as the call's error: the whole replica must
    then be restarted."""
    options = [
        ("grpc.max_send_message_length", INTERNAL_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", INTERNAL_MESSAGE_BYTES),
        *KEEPALIVE_OPTIONS,
    ]
    sessions = SessionGate()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=WORKERS), interceptors=[LinkGuard(token, sessions)], options=options)
    distributed = description.model.tp * description.model.pp > 1
    main_thread = MainThread(executor.heartbeat if distributed else None, keepalive_interval(config.replica.collective_timeout_s))
    service = ShardService(executor, description, main_thread, sessions)
    shard_pb2_grpc.add_ShardServicer_to_server(service, server)
    try:
        bound = _listen(server, config)
    except RuntimeError:
        bound = 0
    if not bound:
        return False
    server.start()

    def stop() -> None:
        server.stop(0)
        main_thread.stop()

    def stop_when_let_go() -> None:
        log.info("SIGTERM: stopping once the gateway has moved this replica's generations (at most %.0f s)", STOP_GRACE_S)
        service.stop_notice.request()
        if not service.stop_notice.wait_sessions_ended(STOP_GRACE_S):
            log.warning("the gateway did not end its session within %.0f s of SIGTERM; stopping anyway", STOP_GRACE_S)
        stop()

    stopping = threading.Thread(target=stop_when_let_go, name="stop-when-let-go", daemon=True)

    def terminate(*_) -> None:
        """SIGTERM: tell the gateway (its session's Attach call) and stop once it has let go; on a
        thread of its own, since a signal handler interrupts the main thread anywhere."""
        if not stopping.is_alive() and not service.stop_notice.requested:
            stopping.start()

    signal.signal(signal.SIGTERM, terminate)
    log.info(
        "driver serving %s on %s (tp %d × pp %d, %d KV blocks of %d tokens)",
        description.model.model,
        config.listen,
        description.model.tp,
        description.model.pp,
        description.num_kv_blocks,
        description.block_size,
    )
    log.info(
        "quantization %s: %d weight bytes read per step, %d KV bytes per token (whole replica)",
        description.model.quantization,
        description.model.weight_bytes_per_step,
        description.model.kv_bytes_per_token,
    )
    try:
        main_thread.serve()
    except Exception:
        server.stop(ANSWER_GRACE_S).wait()
        raise
    server.wait_for_termination()
    return True


def keepalive_interval(collective_timeout_s: float) -> float:
    """Seconds an idle driver waits before a heartbeat keeps the other ranks' wait in the
    control-group broadcast within the collective timeout."""
    return min(5.0, collective_timeout_s / 4)
