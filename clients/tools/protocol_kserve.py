"""The bench's KServe v2 driver: each request is one greedy generation streamed over
ModelStreamInfer (Triton's decoupled streaming, kserve_v2.proto) in the LLM tensor convention
of Triton's vLLM backend, with our own stubs on grpc.aio.

    async with KServeDriver("127.0.0.1:50051", client_options) as driver:
        async for new_tokens in driver.stream(item, ignore_eos=True):
            ...
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import grpc

from shardgate.clients.client import DEFAULT_MAX_MESSAGE_BYTES, make_channel
from shardgate.clients.connection import NO_RETRY, call_metadata
from shardgate.clients.errors import ShardgateError, error_for, from_rpc_error
from shardgate.clients.tools.workload import WorkItem
from shardgate.proto import inference_pb2, inference_pb2_grpc, kserve_v2_pb2, kserve_v2_pb2_grpc
from shardgate.proto.kserve_tensors import BOOL, BYTES, UINT32, decode_raw, encode_raw

NUM_OUTPUT_TOKENS = "num_output_tokens"


def stream_request(model: str, prompt: str, max_new_tokens: int, ignore_eos: bool) -> kserve_v2_pb2.ModelInferRequest:
    """A greedy streamed request asking for each response's token count, ended by an empty
    final response."""
    tensors = [
        ("text_input", BYTES, prompt.encode()),
        ("stream", BOOL, True),
        ("sampling_parameters", BYTES, json.dumps({"max_tokens": max_new_tokens, "temperature": 0, "ignore_eos": ignore_eos}).encode()),
        ("return_num_output_tokens", BOOL, True),
    ]
    request = kserve_v2_pb2.ModelInferRequest(model_name=model)
    for name, datatype, value in tensors:
        request.inputs.add(name=name, datatype=datatype, shape=[1])
        request.raw_input_contents.append(encode_raw(datatype, [value]))
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    return request


def stream_error(message: str) -> ShardgateError:
    """The exception for a request's error_message on the stream ("CODE: message", as shardgate
    writes it; another server's message without a code is UNKNOWN)."""
    code_name, _, details = message.partition(": ")
    code = grpc.StatusCode.__members__.get(code_name)
    return error_for(code, details) if code is not None else error_for(grpc.StatusCode.UNKNOWN, message)


def output_tokens(response: kserve_v2_pb2.ModelInferResponse) -> int:
    """The num_output_tokens a response carries (0 for one without it, such as the final one)."""
    for index, output in enumerate(response.outputs):
        if output.name == NUM_OUTPUT_TOKENS:
            if index < len(response.raw_output_contents):
                return sum(decode_raw(UINT32, response.raw_output_contents[index]))
            return sum(output.contents.uint_contents)
    return 0


class KServeDriver:
    """Sends the bench's requests over KServe v2. `client_options` are AsyncClient's keyword
    arguments (timeout, tls, token; retry does not apply: a stream is never re-sent)."""

    def __init__(self, address: str, client_options: dict) -> None:
        self.timeout = client_options.get("timeout")
        self.token = client_options.get("token")
        self._channel = make_channel(grpc.aio, address, client_options.get("tls"), DEFAULT_MAX_MESSAGE_BYTES, NO_RETRY)
        self._stub = kserve_v2_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._model: str | None = None

    async def __aenter__(self) -> KServeDriver:
        """Reads the served model's name, which every KServe request names, from the native
        ModelInfo (KServe v2 has no call that lists models)."""
        try:
            info = await inference_pb2_grpc.InferenceStub(self._channel).ModelInfo(
                inference_pb2.ModelInfoRequest(), timeout=self.timeout, metadata=call_metadata(self.token)
            )
        except grpc.RpcError as raw:
            await self._channel.close()
            raise from_rpc_error(raw) from None
        self._model = info.model
        return self

    async def __aexit__(self, *exc) -> None:
        await self._channel.close()

    async def stream(self, item: WorkItem, ignore_eos: bool) -> AsyncIterator[int]:
        """One greedy streamed request over ModelStreamInfer; yields the number of new tokens
        each received response carries (num_output_tokens)."""
        prompt = getattr(item, "prompt_text", None)
        if prompt is None:
            raise ValueError("the KServe driver sends text prompts: the work item has no prompt_text")
        call = self._stub.ModelStreamInfer(timeout=self.timeout, metadata=call_metadata(self.token))
        try:
            await call.write(stream_request(self._model, prompt, item.max_new_tokens, ignore_eos))
            await call.done_writing()
            async for message in call:
                if message.error_message:
                    raise stream_error(message.error_message)
                response = message.infer_response
                tokens = output_tokens(response)
                if tokens:
                    yield tokens
                final = response.parameters.get("triton_final_response")
                if final is not None and final.bool_param:
                    return
            raise error_for(grpc.StatusCode.UNKNOWN, "the stream ended before the request's final response")
        except grpc.RpcError as raw:
            raise from_rpc_error(raw) from None
        finally:
            call.cancel()
