"""Big inputs never stall the event loop: a prompt the context could never hold is refused by its
length at once, and a big valid input is tokenized off the loop while other streams flow. Errors
carry machine-readable details (RetryInfo, BadRequest) on the native and KServe services, and the
client library reads them."""

from __future__ import annotations

import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from servers import start_server, wait_until

from shardgate.clients import InvalidRequest, Overloaded, RequestFailed
from shardgate.proto import inference_pb2, kserve_v2_pb2, kserve_v2_pb2_grpc
from shardgate.proto.kserve_tensors import BYTES, encode_raw

BIG_PROMPT_CHARS = 3_900_000
"""Under the 4 MiB message limit, far over what the tiny model's context holds."""
BIG_CALLS, BIG_CALLS_IN_FLIGHT = 20, 4
"""A client sending 20 such prompts, 4 at a time (all 20 at once measures the loopback's copying more than the server)."""
MAX_CONCURRENT = 3
MAX_GAP_S = 0.5
GENERATE = "/shardgate.v1.Inference/Generate"
TOKENIZE = "/shardgate.v1.Inference/Tokenize"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_server(
        tmp_path_factory.mktemp("big-inputs"), "--kv-cache-memory", str(64 << 20), "--max-concurrent-requests", str(MAX_CONCURRENT)
    )
    yield server
    assert server.process.poll() is None, "the server died"
    server.stop()


class StreamWatch:
    """Streams generations back to back on a thread of its own until stopped, noting when each
    message arrives; `largest_gap` is the longest wait for a message during a time window."""

    def __init__(self, address: str) -> None:
        self._channel = grpc.insecure_channel(address)
        self._stop = threading.Event()
        self.arrivals: list[float] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        stream = self._channel.unary_stream(
            "/shardgate.v1.Inference/GenerateStream",
            request_serializer=inference_pb2.GenerateRequest.SerializeToString,
            response_deserializer=inference_pb2.GenerateStreamResponse.FromString,
        )
        request = inference_pb2.GenerateRequest(prompt="watch", max_new_tokens=400, ignore_eos=True)
        while not self._stop.is_set():
            for _ in stream(request, timeout=120):
                self.arrivals.append(time.monotonic())

    def largest_gap(self, start: float, end: float) -> float:
        """The longest time between two messages (of one stream or the next) while [start, end] ran."""
        pairs = zip(self.arrivals, self.arrivals[1:])
        return max(b - a for a, b in pairs if b > start and a < end)

    def __enter__(self) -> StreamWatch:
        self._thread.start()
        wait_until(lambda: len(self.arrivals) >= 5, timeout=60, what="the watched stream flows")
        return self

    def __exit__(self, *exc) -> None:
        ended = time.monotonic()
        wait_until(lambda: self.arrivals[-1] > ended, timeout=60, what="a message after the watched window")
        self._stop.set()
        self._thread.join(120)
        self._channel.close()


def timed_raw_call(channel: grpc.Channel, method: str, payload: bytes) -> tuple[float, grpc.StatusCode, grpc.RpcError | bytes]:
    """One call with a pre-serialized request and the response left unparsed, so that the test
    process spends no time per byte beside the watched stream."""
    started = time.monotonic()
    try:
        response = channel.unary_unary(method)(payload, timeout=60)
        return time.monotonic() - started, grpc.StatusCode.OK, response
    except grpc.RpcError as error:
        return time.monotonic() - started, error.code(), error


def test_prompts_the_context_could_never_hold_are_refused_at_once_while_a_stream_flows(server):
    payload = inference_pb2.GenerateRequest(prompt="x" * BIG_PROMPT_CHARS, max_new_tokens=4).SerializeToString()
    with grpc.insecure_channel(server.address) as channel, StreamWatch(server.address) as watch:
        start = time.monotonic()
        with ThreadPoolExecutor(BIG_CALLS_IN_FLIGHT) as pool:
            results = list(pool.map(lambda _: timed_raw_call(channel, GENERATE, payload), range(BIG_CALLS)))
        end = time.monotonic()
    gap = watch.largest_gap(start, end)
    latencies = [latency for latency, _, _ in results]
    assert {code for _, code, _ in results} == {grpc.StatusCode.INVALID_ARGUMENT}
    error = results[0][2]
    assert error.details().startswith(f"prompt: {BIG_PROMPT_CHARS} characters make more than ")
    violation = bad_request(error)
    assert violation.field == "prompt"
    print(f"big prompts: median {statistics.median(latencies):.3f} s, max {max(latencies):.3f} s; stream gap {gap:.3f} s")
    assert statistics.median(latencies) < 0.2, latencies
    assert gap < MAX_GAP_S


def test_a_big_valid_tokenize_runs_off_the_event_loop(server):
    text = "hello world, tokenize me. " * 40_000  # 1 MB: a million tokens of the byte-level tiny model
    payload = inference_pb2.TokenizeRequest(text=text).SerializeToString()
    options = [("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(server.address, options=options) as channel, StreamWatch(server.address) as watch:
        start = time.monotonic()
        latency, code, response = timed_raw_call(channel, TOKENIZE, payload)
    gap = watch.largest_gap(start, start + latency)
    assert code == grpc.StatusCode.OK, response
    tokenized = inference_pb2.TokenizeResponse.FromString(response)
    assert len(tokenized.token_ids) == len(tokenized.tokens) == len(text.encode())
    assert "".join(tokenized.tokens[:2]) == "he"
    print(f"1 MB Tokenize: {latency:.3f} s; stream gap {gap:.3f} s")
    assert gap < MAX_GAP_S


def test_a_big_embed_input_is_refused_by_its_length(server, client_for):
    with client_for(server) as client, pytest.raises(InvalidRequest) as raised:
        client.embed(["fine", "y" * BIG_PROMPT_CHARS])
    assert raised.value.field == "inputs[1]"


@pytest.fixture
def client_for():
    return lambda server: server.client(timeout=60)


def bad_request(error: grpc.RpcError) -> error_details_pb2.BadRequest.FieldViolation:
    status = rpc_status.from_call(error)
    assert status is not None and len(status.details) == 1
    detail = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(detail)
    return detail.field_violations[0]


def test_the_client_reads_the_field_and_the_retry_delay(server, client_for):
    with client_for(server) as client:
        with pytest.raises(InvalidRequest) as raised:
            client.generate("hi", max_new_tokens=0)
        assert raised.value.field == "max_new_tokens" and raised.value.retry_delay is None
        with client.bidi() as bidi:
            bidi.generate("bad", "hi", max_new_tokens=0)
            bidi.done_writing()
            events = list(bidi)
        assert len(events) == 1 and isinstance(events[0], RequestFailed) and events[0].error.field == "max_new_tokens"

        streams = [client.stream("hold", max_new_tokens=1000, ignore_eos=True) for _ in range(MAX_CONCURRENT)]
        try:
            for stream in streams:
                next(stream)  # admitted and running
            with pytest.raises(Overloaded) as raised:
                client.generate("one too many", max_new_tokens=2)
            assert raised.value.retry_delay == 1.0 and "max_concurrent_requests" in raised.value.details()
        finally:
            for stream in streams:
                stream.close()
        wait_until(lambda: client.server_status().active_requests == 0, what="the held streams end")


def test_kserve_errors_carry_the_details_too(server):
    request = kserve_v2_pb2.ModelInferRequest(model_name="builtin:tiny")
    request.inputs.add(name="text_input", datatype=BYTES, shape=[1])
    request.raw_input_contents.append(encode_raw(BYTES, [b"x" * BIG_PROMPT_CHARS]))
    request.inputs.add(name="sampling_parameters", datatype=BYTES, shape=[1])
    request.raw_input_contents.append(encode_raw(BYTES, [json.dumps({"max_tokens": 4}).encode()]))
    with grpc.insecure_channel(server.address) as channel:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as raised:
            kserve_v2_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
        latency = time.monotonic() - started
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and bad_request(raised.value).field == "prompt"
    assert latency < 2.0  # refused by its length: no tokenizing (seconds for this many characters)
    assert status_pb2.Status  # the google.rpc.Status the trailer holds (parsed by rpc_status.from_call above)
