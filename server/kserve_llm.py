"""The LLM tensor convention of Triton's vLLM backend, over KServe v2 messages: a
ModelInferRequest's tensors become a GenerateRequest (the engine API's request type), and
generated text becomes response tensors.

Inputs (each holds one element): `text_input` (BYTES, the prompt; required), `stream` (BOOL:
one response per step's new text), `sampling_parameters` (BYTES: a JSON object of
GenerateRequest's fields, see SAMPLING_KEYS), `exclude_input_in_output` (BOOL), and
`return_finish_reason`, `return_num_input_tokens`, `return_num_output_tokens` (BOOL), which add
the outputs `finish_reason` (BYTES), `num_input_tokens` and `num_output_tokens` (UINT32, the
tokens of that one response). `text_output` (BYTES) is always produced. As in the vLLM
backend, a response that is not streamed starts with the prompt unless
exclude_input_in_output is true, and a streamed one never does.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import grpc

from shardgate.proto import inference_pb2, kserve_v2_pb2
from shardgate.proto.kserve_tensors import BOOL, BYTES, UINT32, decode_raw, encode_raw, num_elements, typed_values
from shardgate.server.request import FinishReason
from shardgate.server.validation import RequestError, invalid

MODEL_VERSION = "1"
"""The one version of the served model; requests may also leave the version empty."""
PLATFORM = "shardgate"

TEXT_INPUT = "text_input"
INPUTS = {
    TEXT_INPUT: BYTES,
    "stream": BOOL,
    "sampling_parameters": BYTES,
    "exclude_input_in_output": BOOL,
    "return_finish_reason": BOOL,
    "return_num_input_tokens": BOOL,
    "return_num_output_tokens": BOOL,
}
"""Every input the model takes, with its data type; each holds one element."""

TEXT_OUTPUT, FINISH_REASON, NUM_INPUT_TOKENS, NUM_OUTPUT_TOKENS = "text_output", "finish_reason", "num_input_tokens", "num_output_tokens"
OUTPUTS = {TEXT_OUTPUT: BYTES, FINISH_REASON: BYTES, NUM_INPUT_TOKENS: UINT32, NUM_OUTPUT_TOKENS: UINT32}
"""Every output the model produces, in the order responses carry them, with its data type."""
_OPTIONAL_OUTPUTS = {
    "return_finish_reason": FINISH_REASON,
    "return_num_input_tokens": NUM_INPUT_TOKENS,
    "return_num_output_tokens": NUM_OUTPUT_TOKENS,
}
"""The input that asks for each optional output."""

DEFAULT_MAX_TOKENS = 16
"""max_new_tokens of a request whose sampling_parameters give neither max_tokens nor
max_new_tokens (vLLM's default)."""

SAMPLING_KEYS = {
    "max_tokens": ("max_new_tokens", "uint32"),
    "max_new_tokens": ("max_new_tokens", "uint32"),
    "temperature": ("temperature", "float"),
    "top_p": ("top_p", "float"),
    "top_k": ("top_k", "int32"),
    "seed": ("seed", "uint64"),
    "stop": ("stop", "strings"),
    "ignore_eos": ("ignore_eos", "bool"),
    "priority": ("priority", "int32"),
    "timeout_ms": ("timeout_ms", "uint32"),
}
"""sampling_parameters keys: the GenerateRequest field each sets, and its kind. Numbers may
also come as strings ("0.7"), as vLLM's clients send them; top_k -1 (vLLM's "off") is 0."""
_INTEGER_RANGES = {"uint32": (0, 2**32 - 1), "int32": (-(2**31), 2**31 - 1), "uint64": (0, 2**64 - 1)}

EMPTY_FINAL_RESPONSE = "triton_enable_empty_final_response"
"""Request parameter: end the request's responses on a stream with an empty one flagged final."""
FINAL_RESPONSE = "triton_final_response"
"""Response parameter on a stream: whether this is the request's last response."""

FINISH_REASONS = {
    FinishReason.LENGTH: "length",
    FinishReason.STOP: "stop",
    FinishReason.EOS: "stop",
    FinishReason.CANCELLED: "abort",
    FinishReason.ERROR: "error",
}
"""The finish_reason output, in vLLM's words (an end-of-sequence token is `stop`); responses
before the last say "None", as the vLLM backend's do."""
NOT_FINISHED = "None"


@dataclass(frozen=True)
class LLMRequest:
    """A ModelInferRequest read by the convention."""

    model: str
    generate: inference_pb2.GenerateRequest
    stream: bool
    """One response per step's new text (else one response with the whole text)."""
    echo_prompt: bool
    """text_output starts with the prompt."""
    outputs: tuple[str, ...]
    """The outputs each response carries, in OUTPUTS order."""
    empty_final_response: bool
    """On a stream: end with an empty response flagged final (else the last response with
    text carries the flag)."""


def check_model(name: str, version: str, model: str) -> None:
    """RequestError(NOT_FOUND) unless name and version are the served model's."""
    if name != model:
        raise RequestError(grpc.StatusCode.NOT_FOUND, "model_name", f"unknown model {name!r} (this server serves {model!r})")
    if version not in ("", MODEL_VERSION):
        raise RequestError(grpc.StatusCode.NOT_FOUND, "model_version", f"{model!r} has no version {version!r} (its one version is 1)")


def model_metadata(model: str) -> kserve_v2_pb2.ModelMetadataResponse:
    tensor = kserve_v2_pb2.ModelMetadataResponse.TensorMetadata
    return kserve_v2_pb2.ModelMetadataResponse(
        name=model,
        versions=[MODEL_VERSION],
        platform=PLATFORM,
        inputs=[tensor(name=name, datatype=datatype, shape=[1]) for name, datatype in INPUTS.items()],
        # As the vLLM backend declares them: num_input_tokens is one number, the others vary.
        outputs=[tensor(name=name, datatype=dtype, shape=[1] if name == NUM_INPUT_TOKENS else [-1]) for name, dtype in OUTPUTS.items()],
    )


def read_request(message: kserve_v2_pb2.ModelInferRequest, model: str, streaming_call: bool) -> LLMRequest:
    """The request's model, tensors and parameters checked and translated; RequestError
    (INVALID_ARGUMENT naming the input or key, NOT_FOUND for another model) when they are wrong.
    `streaming_call`: the request came on ModelStreamInfer (only there may `stream` be true)."""
    check_model(message.model_name, message.model_version, model)
    values = input_values(message)
    if TEXT_INPUT not in values:
        raise invalid(TEXT_INPUT, "required (the prompt, a BYTES tensor of one element)")
    try:
        prompt = values[TEXT_INPUT].decode("utf-8")
    except UnicodeDecodeError:
        raise invalid(TEXT_INPUT, "not valid UTF-8") from None
    stream = values.get("stream", False)
    if stream and not streaming_call:
        raise invalid("stream", "must be false on ModelInfer (stream with ModelStreamInfer)")
    exclude_input = values.get("exclude_input_in_output")
    if stream and exclude_input is False:
        raise invalid("exclude_input_in_output", "must be true when streaming (a stream never repeats the prompt)")
    generate = generate_request(values.get("sampling_parameters"))
    generate.prompt = prompt
    generate.request_id = message.id
    return LLMRequest(
        model=model,
        generate=generate,
        stream=stream,
        echo_prompt=not stream and not exclude_input,
        outputs=_outputs(message, values),
        empty_final_response=_bool_parameter(message, EMPTY_FINAL_RESPONSE),
    )


def input_values(message: kserve_v2_pb2.ModelInferRequest) -> dict[str, object]:
    """Each input's one element, by name, from its typed contents or raw_input_contents."""
    raw = message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise invalid("raw_input_contents", f"{len(raw)} entries for {len(message.inputs)} inputs (one per input, in order)")
    values: dict[str, object] = {}
    for index, tensor in enumerate(message.inputs):
        name = tensor.name
        if name not in INPUTS:
            raise invalid("inputs", f"unknown input {name!r} (the model takes {', '.join(INPUTS)})")
        if name in values:
            raise invalid(name, "given twice")
        if tensor.datatype != INPUTS[name]:
            raise invalid(name, f"datatype must be {INPUTS[name]}, got {tensor.datatype!r}")
        if raw and tensor.HasField("contents"):
            raise invalid(name, "has contents while the request uses raw_input_contents (use one or the other)")
        try:
            elements = decode_raw(tensor.datatype, raw[index]) if raw else typed_values(tensor.contents, tensor.datatype)
        except ValueError as error:
            raise invalid(name, str(error)) from None
        if len(elements) != 1 or num_elements(tensor.shape) != 1:
            raise invalid(name, f"must hold one element (shape {list(tensor.shape)}, {len(elements)} elements given)")
        values[name] = elements[0]
    return values


def generate_request(sampling_parameters: bytes | None) -> inference_pb2.GenerateRequest:
    """A GenerateRequest (no prompt yet) with the sampling_parameters' fields set."""
    request = inference_pb2.GenerateRequest(max_new_tokens=DEFAULT_MAX_TOKENS)
    if sampling_parameters is None:
        return request
    try:
        parameters = json.loads(sampling_parameters)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise invalid("sampling_parameters", f"not valid JSON ({error})") from None
    if not isinstance(parameters, dict):
        raise invalid("sampling_parameters", f"must be a JSON object, got {type(parameters).__name__}")
    if "max_tokens" in parameters and "max_new_tokens" in parameters:
        raise invalid("sampling_parameters", "give max_tokens or max_new_tokens, not both")
    for key, value in parameters.items():
        if key not in SAMPLING_KEYS:
            raise invalid("sampling_parameters", f"unknown key {key!r} (known: {', '.join(SAMPLING_KEYS)})")
        field, kind = SAMPLING_KEYS[key]
        if kind == "strings":
            request.stop[:] = _strings(key, value)
        elif kind == "bool":
            setattr(request, field, _bool(key, value))
        elif kind == "float":
            setattr(request, field, _number(key, value))
        else:
            number = _integer(key, value)
            if key == "top_k" and number == -1:
                number = 0
            low, high = _INTEGER_RANGES[kind]
            if not low <= number <= high:
                raise invalid("sampling_parameters", f"{key} must be in [{low}, {high}], got {number}")
            setattr(request, field, number)
    return request


def _number(key: str, value: object) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise invalid("sampling_parameters", f"{key} must be a number, got {value!r}")


def _integer(key: str, value: object) -> int:
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise invalid("sampling_parameters", f"{key} must be an integer, got {value!r}")


def _bool(key: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise invalid("sampling_parameters", f"{key} must be true or false, got {value!r}")


def _strings(key: str, value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    raise invalid("sampling_parameters", f"{key} must be a string or a list of strings, got {value!r}")


def _bool_parameter(message: kserve_v2_pb2.ModelInferRequest, name: str) -> bool:
    parameter = message.parameters.get(name)
    return parameter is not None and parameter.WhichOneof("parameter_choice") == "bool_param" and parameter.bool_param


def _outputs(message: kserve_v2_pb2.ModelInferRequest, values: dict[str, object]) -> tuple[str, ...]:
    """text_output, the optional outputs the return_* inputs ask for, and any the request names
    in `outputs`; only those it names when it names some."""
    requested = [output.name for output in message.outputs]
    for name in requested:
        if name not in OUTPUTS:
            raise invalid("outputs", f"unknown output {name!r} (the model produces {', '.join(OUTPUTS)})")
    if requested:
        return tuple(name for name in OUTPUTS if name in requested)
    return (TEXT_OUTPUT, *(output for flag, output in _OPTIONAL_OUTPUTS.items() if values.get(flag)))


def infer_response(
    llm: LLMRequest,
    text: str,
    num_output_tokens: int,
    num_input_tokens: int,
    finish_reason: FinishReason | None,
    final: bool | None = None,
) -> kserve_v2_pb2.ModelInferResponse:
    """One response: the request's outputs in raw_output_contents, and on a stream (`final`
    not None) the triton_final_response parameter."""
    response = kserve_v2_pb2.ModelInferResponse(model_name=llm.model, model_version=MODEL_VERSION, id=llm.generate.request_id)
    values = {
        TEXT_OUTPUT: text.encode("utf-8"),
        FINISH_REASON: (NOT_FINISHED if finish_reason is None else FINISH_REASONS[finish_reason]).encode(),
        NUM_INPUT_TOKENS: num_input_tokens,
        NUM_OUTPUT_TOKENS: num_output_tokens,
    }
    for name in llm.outputs:
        response.outputs.add(name=name, datatype=OUTPUTS[name], shape=[1])
        response.raw_output_contents.append(encode_raw(OUTPUTS[name], [values[name]]))
    if final is not None:
        response.parameters[FINAL_RESPONSE].bool_param = final
    return response


def empty_final_response(llm: LLMRequest) -> kserve_v2_pb2.ModelInferResponse:
    """The response with no outputs that ends a request's responses on a stream."""
    response = kserve_v2_pb2.ModelInferResponse(model_name=llm.model, model_version=MODEL_VERSION, id=llm.generate.request_id)
    response.parameters[FINAL_RESPONSE].bool_param = True
    return response
