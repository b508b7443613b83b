"""gRPC handlers of the KServe v2 / Open Inference Protocol service (`inference.
GRPCInferenceService`, kserve_v2.proto): a thin adapter from Triton's LLM tensor convention
(kserve_llm.py) to the engine API, as service.py is for the native API. Requests share the
native API's admission, deadlines, priorities and metrics (labelled protocol="kserve"), and
its errors: a RequestError's code and message become the call's status, or, on
ModelStreamInfer, that one request's `error_message` ("CODE: message") while the stream goes on.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from importlib import metadata

from shardgate.proto import kserve_v2_pb2, kserve_v2_pb2_grpc
from shardgate.server.delivery import OutputStream
from shardgate.server.engine_api import EngineAPI, Generation
from shardgate.server.kserve_llm import (
    FINISH_REASON,
    LLMRequest,
    check_model,
    empty_final_response,
    infer_response,
    model_metadata,
    read_request,
)
from shardgate.server.rich_status import abort
from shardgate.server.service import call_deadline
from shardgate.server.tenancy import current_tenant
from shardgate.server.validation import RequestError

PROTOCOL = "kserve"
SERVER_NAME = "shardgate"


class KServeService(kserve_v2_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, api: EngineAPI) -> None:
        self.api = api
        self._model: str | None = None

    def model(self) -> str:
        """The served model's name; RequestError(UNAVAILABLE) while it loads or the server drains."""
        self.api.check_ready()
        if self._model is None:  # every replica serves the same model, restarts included
            self._model = self.api.describe().model
        return self._model

    async def ServerLive(self, request, context) -> kserve_v2_pb2.ServerLiveResponse:
        return kserve_v2_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context) -> kserve_v2_pb2.ServerReadyResponse:
        return kserve_v2_pb2.ServerReadyResponse(ready=self._ready())

    async def ModelReady(self, request, context) -> kserve_v2_pb2.ModelReadyResponse:
        if not self._ready():
            return kserve_v2_pb2.ModelReadyResponse(ready=False)
        try:
            check_model(request.name, request.version, self.model())
        except RequestError as error:
            await abort(context, error)
        return kserve_v2_pb2.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request, context) -> kserve_v2_pb2.ServerMetadataResponse:
        return kserve_v2_pb2.ServerMetadataResponse(name=SERVER_NAME, version=metadata.version("shardgate"))

    async def ModelMetadata(self, request, context) -> kserve_v2_pb2.ModelMetadataResponse:
        try:
            model = self.model()
            check_model(request.name, request.version, model)
        except RequestError as error:
            await abort(context, error)
        return model_metadata(model)

    async def ModelInfer(self, request, context) -> kserve_v2_pb2.ModelInferResponse:
        try:
            llm, generation = await self._start(request, call_deadline(context), streaming_call=False)
            async with aclosing(self._responses(llm, generation, on_stream=False)) as responses:
                return await anext(responses)  # not streamed: the one response
        except RequestError as error:
            await abort(context, error)

    async def ModelStreamInfer(self, request_iterator, context) -> AsyncIterator[kserve_v2_pb2.ModelStreamInferResponse]:
        """Requests start as they arrive, several at a time; each one's responses go out as they
        are made, interleaved. The stream ends once the client has half-closed and every request
        has ended; if the call ends first (cancelled, deadline), every live request is cancelled."""
        try:
            self.api.check_ready()  # a stream opened while the engine cannot serve ends at once
        except RequestError as error:
            await abort(context, error)
        deadline = call_deadline(context)
        outbox = self.api.open_outbox()  # backpressure as on GenerateBidi (service.py)
        live: set[Generation] = set()
        relays: set[asyncio.Task] = set()

        def fail(request: kserve_v2_pb2.ModelInferRequest, error: RequestError) -> None:
            response = kserve_v2_pb2.ModelInferResponse(model_name=request.model_name, model_version=request.model_version, id=request.id)
            outbox.put(kserve_v2_pb2.ModelStreamInferResponse(error_message=f"{error.code.name}: {error}", infer_response=response))

        async def relay(request: kserve_v2_pb2.ModelInferRequest, llm: LLMRequest, generation: Generation) -> None:
            try:
                async with aclosing(self._responses(llm, generation, on_stream=True)) as responses:
                    async for response in responses:
                        message = kserve_v2_pb2.ModelStreamInferResponse(infer_response=response)
                        await outbox.send(message, on_stall=generation.release_admission)
            except RequestError as error:
                fail(request, error)
            finally:
                live.discard(generation)
                outbox.wake()

        async def read() -> None:
            async for request in request_iterator:
                try:
                    llm, generation = await self._start(request, deadline, streaming_call=True, stream=outbox.stream)
                except RequestError as error:
                    fail(request, error)
                else:
                    live.add(generation)
                    task = asyncio.create_task(relay(request, llm, generation), name=f"kserve stream {generation.request_id}")
                    relays.add(task)
                    task.add_done_callback(relays.discard)
                await outbox.stream.room()  # a client that reads nothing cannot make the stream buffer more

        reader = asyncio.create_task(read(), name="kserve stream reader")
        try:
            async with aclosing(outbox.messages(reader, live)) as messages:
                async for message in messages:
                    yield message  # resumes once the transport took it
        finally:
            reader.cancel()
            for task in list(relays):
                task.cancel()
            for generation in list(live):  # also those whose relay never started
                self.api.abort(generation)

    def _ready(self) -> bool:
        return self.api.serving and not self.api.draining

    async def _start(
        self, request: kserve_v2_pb2.ModelInferRequest, deadline: float | None, streaming_call: bool, stream: OutputStream | None = None
    ) -> tuple[LLMRequest, Generation]:
        """Reads the request and submits it to the engine; RequestError if either refuses it (a
        request that does not translate counts in the metrics as one the engine refused). On a
        stream, requests start in the order they came."""
        model = self.model()
        try:
            llm = read_request(request, model, streaming_call)
        except RequestError as error:
            self.api.refused(request.id, error, PROTOCOL)
            raise
        return llm, await self.api.generate(llm.generate, deadline, protocol=PROTOCOL, tenant=current_tenant(), stream=stream)

    async def _responses(self, llm: LLMRequest, generation: Generation, on_stream: bool) -> AsyncIterator[kserve_v2_pb2.ModelInferResponse]:
        """The request's responses: one per output when it streams, else one with the whole text
        (after the prompt, when echoed). On ModelStreamInfer (`on_stream`) each is flagged final
        or not; with empty final responses asked for, an empty one flagged final comes last,
        else the last one with outputs is flagged."""
        empty_final = on_stream and llm.empty_final_response
        flag_last = (not empty_final) if on_stream else None
        async with aclosing(generation.outputs()) as outputs:
            if llm.stream:
                async for output in outputs:
                    last = output.finish_reason is not None
                    if last and empty_final and not (output.text or output.token_ids) and FINISH_REASON not in llm.outputs:
                        break  # nothing left to say: the empty final response ends it
                    final = flag_last if last else False
                    yield infer_response(llm, output.text, len(output.token_ids), generation.prompt_tokens, output.finish_reason, final)
            else:
                text, num_tokens = [llm.generate.prompt] if llm.echo_prompt else [], 0
                async for output in outputs:
                    text.append(output.text)
                    num_tokens += len(output.token_ids)
                    finish_reason = output.finish_reason
                yield infer_response(llm, "".join(text), num_tokens, generation.prompt_tokens, finish_reason, flag_last)
        if empty_final:
            yield empty_final_response(llm)
