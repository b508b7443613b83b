"""Talks to a shardgate server with Triton's own client library (tritonclient.grpc), as a
platform team's client would; prints what it saw as one JSON object.

Run by tests/integration/test_kserve.py with the python of a virtual environment of its own
(tritonclient pins protobuf < 7, shardgate's stubs need 7), so it imports nothing of shardgate:

    python kserve_client_script.py ADDRESS SCENARIO JSON_ARGS
"""

from __future__ import annotations

import json
import queue
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException


def text_inputs(prompt: str, sampling_parameters: dict | str | None = None, **flags: bool) -> list[grpcclient.InferInput]:
    """text_input, sampling_parameters (a dict as JSON, or a string as it is) and BOOL flags."""
    inputs = [grpcclient.InferInput("text_input", [1], "BYTES")]
    inputs[-1].set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    if sampling_parameters is not None:
        encoded = sampling_parameters if isinstance(sampling_parameters, str) else json.dumps(sampling_parameters)
        inputs.append(grpcclient.InferInput("sampling_parameters", [1], "BYTES"))
        inputs[-1].set_data_from_numpy(np.array([encoded.encode()], dtype=np.object_))
    for name, value in flags.items():
        inputs.append(grpcclient.InferInput(name, [1], "BOOL"))
        inputs[-1].set_data_from_numpy(np.array([value], dtype=bool))
    return inputs


def outputs_of(result: grpcclient.InferResult) -> dict:
    """Every output of a response as plain JSON values, and its final flag."""
    response = result.get_response()
    values = {}
    for output in response.outputs:
        array = result.as_numpy(output.name)
        values[output.name] = [v.decode() if isinstance(v, bytes) else int(v) for v in array.reshape(-1)]
    final = response.parameters["triton_final_response"].bool_param if "triton_final_response" in response.parameters else None
    return {"id": response.id, "model_name": response.model_name, "outputs": values, "final": final}


def error_of(error: InferenceServerException) -> dict:
    return {"status": error.status(), "message": error.message()}


def probe(client: grpcclient.InferenceServerClient, model: str) -> dict:
    return {
        "live": client.is_server_live(),
        "server_ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        "model_ready_version_1": client.is_model_ready(model, "1"),
        "server_metadata": client.get_server_metadata(as_json=True),
        "model_metadata": client.get_model_metadata(model, as_json=True),
    }


def infer(client: grpcclient.InferenceServerClient, model: str, requests: list[dict]) -> list[dict]:
    """Each request on ModelInfer: its response's outputs, or its error."""
    results = []
    for request in requests:
        try:
            result = client.infer(
                request.get("model", model),
                text_inputs(request["prompt"], request.get("sampling_parameters"), **request.get("flags", {})),
                request_id=request.get("id", ""),
                outputs=[grpcclient.InferRequestedOutput(name) for name in request.get("outputs", [])] or None,
            )
            results.append(outputs_of(result))
        except InferenceServerException as error:
            results.append({"error": error_of(error)})
    return results


def stream(client: grpcclient.InferenceServerClient, model: str, requests: list[dict]) -> dict:
    """All requests on one ModelStreamInfer stream at once (ids "0", "1", ...): every response by
    request id in arrival order, and the errors in arrival order (tritonclient does not say
    which request an error belongs to), until each request expected to succeed has had its
    final response and each marked `"fails": true` an error."""
    received: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: received.put((result, error)))
    try:
        for index, request in enumerate(requests):
            client.async_stream_infer(
                request.get("model", model),
                text_inputs(request["prompt"], request.get("sampling_parameters"), **request.get("flags", {})),
                request_id=str(index),
                enable_empty_final_response=request.get("empty_final", True),
            )
        responses: dict[str, list] = {str(index): [] for index in range(len(requests))}
        errors: list[dict] = []
        pending = {str(index) for index, request in enumerate(requests) if not request.get("fails")}
        failing = len(requests) - len(pending)
        while pending or len(errors) < failing:
            result, error = received.get(timeout=120)
            if error is not None:
                errors.append(error_of(error))
                continue
            response = outputs_of(result)
            responses[response["id"]].append(response)
            if response["final"]:
                pending.discard(response["id"])
    finally:
        client.stop_stream()
    return {"responses": responses, "errors": errors}


def schema(names: list[str]) -> dict:
    """tritonclient's own descriptors of these messages: each field's number, type and whether it repeats."""

    def fields(descriptor) -> dict:
        described = {f.name: [f.number, f.type, f.is_repeated] for f in descriptor.fields}
        for nested in descriptor.nested_types:
            if not nested.GetOptions().map_entry:
                described[nested.name] = fields(nested)
        return described

    services = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    return {
        "messages": {name: fields(service_pb2.DESCRIPTOR.message_types_by_name[name]) for name in names},
        "methods": {m.name: [m.input_type.name, m.output_type.name] for m in services.methods},
    }


def main() -> None:
    address, scenario, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    if scenario == "schema":
        print(json.dumps(schema(args["messages"])))
        return
    with grpcclient.InferenceServerClient(address) as client:
        if scenario == "probe":
            result = probe(client, args["model"])
        elif scenario == "infer":
            result = infer(client, args["model"], args["requests"])
        elif scenario == "stream":
            result = stream(client, args["model"], args["requests"])
        else:
            raise SystemExit(f"unknown scenario {scenario!r}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
