"""The KServe v2 / Open Inference Protocol frontend against a real server: with Triton's own
client library (tritonclient.grpc, from a virtual environment of its own, as an outside client
would be: it pins protobuf < 7, shardgate needs 7) and with our stubs."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from otlp_receiver import otlp_receiver
from servers import launch_server, start_server, wait_until

from shardgate.clients.errors import InvalidRequest, Unauthenticated, Unavailable
from shardgate.clients.tools.protocol_kserve import KServeDriver
from shardgate.clients.tools.workload import WorkItem
from shardgate.proto import inference_pb2, kserve_v2_pb2, kserve_v2_pb2_grpc
from shardgate.proto.common import free_port
from shardgate.proto.kserve_tensors import BOOL, BYTES, decode_raw, encode_raw

ROOT = Path(__file__).resolve().parents[2]
TRITONCLIENT = "tritonclient[grpc]==2.73.0"
TRITON_VENV = ROOT / ".venv-tritonclient"
"""Made once and reused (git-ignored); remade when the pin changes."""
SCRIPT = ROOT / "tests" / "kserve_client_script.py"
README = ROOT / "README.md"
SERVICE = "inference.GRPCInferenceService"
MODEL = "builtin:tiny"
PROMPT = "The KServe protocol"
GREEDY = {"max_tokens": 12, "temperature": 0, "ignore_eos": True}
SERVER_SPAN = 2  # opentelemetry.proto.trace.v1.Span.SpanKind


@pytest.fixture(scope="module")
def triton_python() -> Path:
    """The python of a virtual environment holding tritonclient[grpc] (and nothing of shardgate)."""
    python = TRITON_VENV / "bin" / "python"
    marker = TRITON_VENV / "shardgate-installed.txt"
    if not (python.exists() and marker.exists() and marker.read_text() == TRITONCLIENT):
        shutil.rmtree(TRITON_VENV, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(TRITON_VENV)], check=True, timeout=120)
        subprocess.run([str(python), "-m", "pip", "install", "-q", TRITONCLIENT], check=True, timeout=600)
        marker.write_text(TRITONCLIENT)
    return python


def triton(python: Path, address: str, scenario: str, **args) -> dict | list:
    """Runs a tests/kserve_client_script.py scenario; its JSON output."""
    done = subprocess.run([str(python), str(SCRIPT), address, scenario, json.dumps(args)], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def native(tiny_server):
    """The native API's greedy completion of PROMPT."""
    with tiny_server.client() as client:
        return client.generate(PROMPT, max_new_tokens=GREEDY["max_tokens"], temperature=0, ignore_eos=True)


def test_our_proto_is_wire_compatible_with_tritonclients(triton_python):
    """Every message, field number and type we define is tritonclient's, and every method we
    serve is one of its service's with the same message types."""
    names = [m for m in kserve_v2_pb2.DESCRIPTOR.message_types_by_name]
    theirs = triton(triton_python, "", "schema", messages=names)

    def fields(descriptor) -> dict:
        described = {f.name: [f.number, f.type, f.is_repeated] for f in descriptor.fields}
        for nested in descriptor.nested_types:
            if not nested.GetOptions().map_entry:
                described[nested.name] = fields(nested)
        return described

    ours = {name: fields(kserve_v2_pb2.DESCRIPTOR.message_types_by_name[name]) for name in names}
    assert json.loads(json.dumps(ours)) == theirs["messages"]
    methods = kserve_v2_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods
    assert len(methods) == 7
    for method in methods:
        assert theirs["methods"][method.name] == [method.input_type.name, method.output_type.name]


def test_liveness_readiness_and_metadata(triton_python, tiny_server):
    probe = triton(triton_python, tiny_server.address, "probe", model=MODEL)
    assert probe["live"] and probe["server_ready"] and probe["model_ready"] and probe["model_ready_version_1"]
    assert probe["server_metadata"]["name"] == "shardgate"
    metadata = probe["model_metadata"]
    assert (metadata["name"], metadata["versions"]) == (MODEL, ["1"])
    inputs = {tensor["name"]: (tensor["datatype"], tensor["shape"]) for tensor in metadata["inputs"]}
    assert inputs["text_input"] == ("BYTES", ["1"])
    assert inputs["sampling_parameters"] == ("BYTES", ["1"])
    assert inputs["stream"] == inputs["exclude_input_in_output"] == inputs["return_num_output_tokens"] == ("BOOL", ["1"])
    outputs = {tensor["name"]: tensor["datatype"] for tensor in metadata["outputs"]}
    assert outputs == {"text_output": "BYTES", "finish_reason": "BYTES", "num_input_tokens": "UINT32", "num_output_tokens": "UINT32"}


def test_infer_equals_the_native_greedy_output(triton_python, tiny_server, native):
    extras = {"return_finish_reason": True, "return_num_input_tokens": True, "return_num_output_tokens": True}
    requests = [
        {"prompt": PROMPT, "sampling_parameters": GREEDY, "flags": {"exclude_input_in_output": True, **extras}, "id": "req-1"},
        {"prompt": PROMPT, "sampling_parameters": GREEDY},  # the prompt is echoed, as the vLLM backend does
        {"prompt": PROMPT, "sampling_parameters": {k: str(v).lower() for k, v in GREEDY.items()}, "outputs": ["text_output"]},
    ]
    excluded, echoed, stringly = triton(triton_python, tiny_server.address, "infer", model=MODEL, requests=requests)
    assert excluded["id"] == "req-1" and excluded["model_name"] == MODEL and excluded["final"] is None
    assert excluded["outputs"] == {
        "text_output": [native.text],
        "finish_reason": ["length"],
        "num_input_tokens": [native.usage.prompt_tokens],
        "num_output_tokens": [len(native.token_ids)],
    }
    assert echoed["outputs"] == {"text_output": [PROMPT + native.text]}
    assert stringly["outputs"] == {"text_output": [PROMPT + native.text]}  # numbers as strings, as vLLM's clients send them


def test_streamed_text_equals_the_native_greedy_output(triton_python, tiny_server, native):
    """Several requests on one stream: each gets one response per step's new text, flagged not
    final, then an empty response flagged final; a bad one gets its error and the others go on."""
    streamed = {"prompt": PROMPT, "sampling_parameters": GREEDY, "flags": {"stream": True, "return_num_output_tokens": True}}
    requests = [
        streamed,
        {"prompt": PROMPT, "sampling_parameters": {"max_tokens": 4, "bogus": 1}, "flags": {"stream": True}, "fails": True},
        {**streamed, "empty_final": False},
        {"prompt": PROMPT, "sampling_parameters": GREEDY, "flags": {"exclude_input_in_output": True}},  # not streamed: one response
    ]
    seen = triton(triton_python, tiny_server.address, "stream", model=MODEL, requests=requests)
    first = seen["responses"]["0"]
    assert [r["final"] for r in first] == [False] * (len(first) - 1) + [True] and len(first) >= 3
    assert first[-1]["outputs"] == {} and all(r["id"] == "0" for r in first)
    assert "".join(r["outputs"]["text_output"][0] for r in first[:-1]) == native.text
    assert sum(r["outputs"]["num_output_tokens"][0] for r in first[:-1]) == len(native.token_ids)
    assert seen["responses"]["1"] == []
    (error,) = seen["errors"]
    assert error["message"].startswith("INVALID_ARGUMENT: sampling_parameters: unknown key 'bogus' (known: max_tokens, ")
    without_empty_final = seen["responses"]["2"]  # the last response with text carries the flag
    assert [r["final"] for r in without_empty_final] == [False] * (len(without_empty_final) - 1) + [True]
    assert "".join(r["outputs"]["text_output"][0] for r in without_empty_final) == native.text
    whole = seen["responses"]["3"]
    assert [(r["outputs"], r["final"]) for r in whole] == [({"text_output": [native.text]}, False), ({}, True)]


def test_bad_requests_get_the_native_apis_statuses_and_messages(triton_python, tiny_server):
    requests = [
        {"prompt": PROMPT, "model": "llama-70b"},
        {"prompt": PROMPT, "sampling_parameters": "{not json"},
        {"prompt": PROMPT, "sampling_parameters": {"max_tokens": 4, "temperature": "hot"}},
        {"prompt": PROMPT, "flags": {"stream": True}},
        {"prompt": PROMPT, "sampling_parameters": {"max_tokens": 100000}},
        {"prompt": PROMPT, "sampling_parameters": {"max_tokens": 4, "priority": 1000}},
    ]
    errors = [r["error"] for r in triton(triton_python, tiny_server.address, "infer", model=MODEL, requests=requests)]
    not_found = f"model_name: unknown model 'llama-70b' (this server serves '{MODEL}')"
    assert errors[0] == {"status": "StatusCode.NOT_FOUND", "message": not_found}
    assert errors[1]["status"] == "StatusCode.INVALID_ARGUMENT" and errors[1]["message"].startswith("sampling_parameters: not valid JSON")
    assert errors[2] == {"status": "StatusCode.INVALID_ARGUMENT", "message": "sampling_parameters: temperature must be a number, got 'hot'"}
    assert errors[3] == {
        "status": "StatusCode.INVALID_ARGUMENT",
        "message": "stream: must be false on ModelInfer (stream with ModelStreamInfer)",
    }
    # Past the translation, the engine API's own checks answer, word for word as on the native API.
    with tiny_server.raw_stub() as stub:
        for error, params in zip(errors[4:], ({"max_new_tokens": 100000}, {"max_new_tokens": 4, "priority": 1000})):
            with pytest.raises(grpc.RpcError) as native_error:
                stub.Generate(inference_pb2.GenerateRequest(prompt=PROMPT, **params), timeout=30)
            assert error == {"status": str(native_error.value.code()), "message": native_error.value.details()}


def test_health_and_reflection_list_the_service(tiny_server):
    with grpc.insecure_channel(tiny_server.address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        (answer,) = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        assert SERVICE in [service.name for service in answer.list_services_response.service]


def stream_request(prompt: str, max_tokens: int, request_id: str = "") -> kserve_v2_pb2.ModelInferRequest:
    """A streamed greedy request in raw_input_contents, as tritonclient sends them."""
    request = kserve_v2_pb2.ModelInferRequest(model_name=MODEL, id=request_id)
    sampling = json.dumps({"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}).encode()
    for name, datatype, value in (("text_input", BYTES, prompt.encode()), ("stream", BOOL, True), ("sampling_parameters", BYTES, sampling)):
        request.inputs.add(name=name, datatype=datatype, shape=[1])
        request.raw_input_contents.append(encode_raw(datatype, [value]))
    return request


def test_typed_contents_are_read_like_raw_ones(tiny_server, native):
    request = kserve_v2_pb2.ModelInferRequest(model_name=MODEL, model_version="1")
    sampling = json.dumps(GREEDY).encode()
    request.inputs.add(name="text_input", datatype=BYTES, shape=[1]).contents.bytes_contents.append(PROMPT.encode())
    request.inputs.add(name="sampling_parameters", datatype=BYTES, shape=[1]).contents.bytes_contents.append(sampling)
    request.inputs.add(name="exclude_input_in_output", datatype=BOOL, shape=[1]).contents.bool_contents.append(True)
    with grpc.insecure_channel(tiny_server.address) as channel:
        response = kserve_v2_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    assert [o.name for o in response.outputs] == ["text_output"]
    assert decode_raw(BYTES, response.raw_output_contents[0]) == [native.text.encode()]


def test_cancelling_the_stream_ends_all_its_requests_and_frees_their_kv(tiny_server):
    async def cancel_mid_stream() -> None:
        async with grpc.aio.insecure_channel(tiny_server.address) as channel:
            call = kserve_v2_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(timeout=120)
            for index in range(3):
                await call.write(stream_request(f"long {index}", 2000, str(index)))
            started = set()
            async for message in call:
                assert not message.error_message
                started.add(message.infer_response.id)
                if len(started) == 3:
                    break
            call.cancel()

    with tiny_server.client() as client:
        total = client.server_status().replicas[0].total_kv_blocks
        asyncio.run(cancel_mid_stream())

        def all_freed() -> bool:
            status = client.server_status()
            return status.active_requests == 0 and status.replicas[0].free_kv_blocks == total

        wait_until(all_freed, timeout=30, what="the stream's requests to end and free their KV blocks")


def test_ready_follows_loading_and_draining_live_stays_true(tmp_path):
    server = launch_server(tmp_path, "--drain-timeout", "30", "--kv-cache-memory", str(16 << 20))
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = kserve_v2_pb2_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerLive(kserve_v2_pb2.ServerLiveRequest(), wait_for_ready=True, timeout=120).live
            assert not stub.ServerReady(kserve_v2_pb2.ServerReadyRequest(), timeout=10).ready  # the port opens before the model loads
            assert not stub.ModelReady(kserve_v2_pb2.ModelReadyRequest(name=MODEL), timeout=10).ready
            wait_until(lambda: stub.ServerReady(kserve_v2_pb2.ServerReadyRequest(), timeout=10).ready, timeout=120, what="ready")
            assert stub.ModelReady(kserve_v2_pb2.ModelReadyRequest(name=MODEL), timeout=10).ready
            with pytest.raises(grpc.RpcError) as error:
                stub.ModelReady(kserve_v2_pb2.ModelReadyRequest(name=MODEL, version="2"), timeout=10)
            assert error.value.code() == grpc.StatusCode.NOT_FOUND
            # A request in flight keeps the server draining after SIGTERM.
            responses = stub.ModelStreamInfer(iter([stream_request("drain", 2000)]), timeout=120)
            assert not next(responses).error_message
            server.process.send_signal(signal.SIGTERM)
            wait_until(lambda: not stub.ServerReady(kserve_v2_pb2.ServerReadyRequest(), timeout=10).ready, timeout=30, what="not ready")
            assert stub.ServerLive(kserve_v2_pb2.ServerLiveRequest(), timeout=10).live
            responses.cancel()
        assert server.process.wait(60) == 0
    finally:
        server.stop()


def test_the_readme_example_runs_as_written(triton_python, tiny_server):
    """The README's tritonclient script (the first python block after "### KServe v2"), pointed at
    this server: its unary and streamed text are the native API's greedy completion."""
    section = README.read_text().split("### KServe v2", 1)[1]
    script = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    script = script.replace('"127.0.0.1:50051", "builtin:smollm2"', f'"{tiny_server.address}", "{MODEL}"')
    with tiny_server.client() as client:
        text = client.generate("The capital of France is", max_new_tokens=32, temperature=0).text
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    done = subprocess.run([str(triton_python), "-c", script], capture_output=True, text=True, encoding="utf-8", env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"live True ready True\ninfer: {text}\nstream: {text}\n"


@dataclass(frozen=True)
class TextItem(WorkItem):
    """A work item with its prompt's text, as the bench hands the KServe driver."""

    prompt_text: str = ""


def test_the_bench_driver_streams_token_counts_that_sum_to_the_output_length(tiny_server):
    async def run() -> tuple[list[int], list[int], Exception]:
        async with KServeDriver(tiny_server.address, {"timeout": 60, "token": None, "tls": None}) as driver:
            counts = [n async for n in driver.stream(TextItem([1, 2], 17, prompt_text=PROMPT), ignore_eos=True)]
            short = [n async for n in driver.stream(TextItem([1, 2], 1, prompt_text="x"), ignore_eos=True)]
            with pytest.raises(InvalidRequest) as error:
                [n async for n in driver.stream(TextItem([1, 2], 100000, prompt_text="x"), ignore_eos=True)]
            with pytest.raises(ValueError, match="no prompt_text"):
                [n async for n in driver.stream(WorkItem([1, 2], 4), ignore_eos=True)]
            return counts, short, error.value

    counts, short, error = asyncio.run(run())
    assert sum(counts) == 17 and all(n > 0 for n in counts) and len(counts) > 1
    assert short == [1]
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("max_new_tokens: must be in [1, 4096], got 100000")


def test_the_bench_driver_reports_a_refused_connection_as_unavailable():
    async def run() -> None:
        async with KServeDriver(f"127.0.0.1:{free_port()}", {"timeout": 5}):
            pass

    with pytest.raises(Unavailable):
        asyncio.run(run())


def test_api_keys_apply_to_kserve_calls(tmp_path):
    """The bench driver's token gets through; without it, UNAUTHENTICATED (every KServe method
    needs the key: test_security.py checks each method reflection lists)."""
    keys = tmp_path / "keys.txt"
    keys.write_text("kserve-key\n")
    server = start_server(tmp_path, "--kv-cache-memory", str(16 << 20), "--api-key-file", str(keys))

    async def stream(token: str | None) -> list[int]:
        async with KServeDriver(server.address, {"timeout": 60, "token": token}) as driver:
            return [n async for n in driver.stream(TextItem([1], 3, prompt_text=PROMPT), ignore_eos=True)]

    try:
        assert sum(asyncio.run(stream("kserve-key"))) == 3
        with pytest.raises(Unauthenticated):
            asyncio.run(stream(None))
    finally:
        server.stop()


def test_kserve_requests_are_traced_and_counted_under_their_protocol(tmp_path, monkeypatch):
    """The server span of a KServe call joins the caller's trace, with the request's stages
    under it; the metrics count its requests (refusals included) under protocol="kserve"."""
    with otlp_receiver() as (endpoint, spans):
        for name in ("OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_TRACES_SAMPLER", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        metrics_port = free_port()
        server = start_server(tmp_path, "--kv-cache-memory", str(16 << 20), "--metrics-port", str(metrics_port))
        try:
            trace_id, caller_span_id = secrets.token_hex(16), secrets.token_hex(8)
            with grpc.insecure_channel(server.address) as channel:
                stub = kserve_v2_pb2_grpc.GRPCInferenceServiceStub(channel)
                traced = stub.ModelStreamInfer(
                    iter([stream_request("count me", 3)]), timeout=60, metadata=[("traceparent", f"00-{trace_id}-{caller_span_id}-01")]
                )
                assert all(not response.error_message for response in traced)
                bad = stream_request("bad", 3)
                bad.raw_input_contents[2] = encode_raw(BYTES, [b'{"best_of": 2}'])
                with pytest.raises(grpc.RpcError):
                    stub.ModelInfer(bad, timeout=60)
            method = "/inference.GRPCInferenceService/ModelStreamInfer"
            received = spans.wait_for(lambda received: any(s.name == method and s.trace_id == trace_id for s in received))
            [call] = [s for s in received if s.name == method and s.trace_id == trace_id]
            assert call.parent_span_id == caller_span_id and call.kind == SERVER_SPAN
            spans.wait_for(lambda received: any(s.parent_span_id == call.span_id for s in received))  # its request's stages
            scraped = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
            kserve = [line for line in scraped.splitlines() if 'protocol="kserve"' in line and not line.startswith("#")]
            assert any('code="OK"' in line and line.endswith(" 1.0") for line in kserve), kserve
            assert any('code="INVALID_ARGUMENT"' in line and line.endswith(" 1.0") for line in kserve), kserve
        finally:
            server.stop()
