"""Interceptors on a real in-process grpc.aio server with a servicer that misbehaves."""

import asyncio

import grpc
import pytest

from shardgate.proto import inference_pb2, inference_pb2_grpc
from shardgate.server.interceptors import AuthInterceptor, HygieneInterceptor
from shardgate.server.tenancy import ApiKeys, current_tenant


class Broken(inference_pb2_grpc.InferenceServicer):
    async def ModelInfo(self, request, context):
        raise RuntimeError("secret detail at /srv/app/model.py line 12, object at 0x7f00deadbeef")

    async def GenerateStream(self, request, context):
        yield inference_pb2.GenerateStreamResponse(text="first")
        raise KeyError("/home/user/.cache/weights")

    async def Tokenize(self, request, context):
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "chosen status")


async def call(interceptors, method, metadata=()):
    server = grpc.aio.server(interceptors=interceptors)
    inference_pb2_grpc.add_InferenceServicer_to_server(Broken(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            try:
                if method == "GenerateStream":
                    return [m async for m in stub.GenerateStream(inference_pb2.GenerateRequest(), metadata=metadata)], None
                return await getattr(stub, method)(getattr(inference_pb2, f"{method}Request")(), metadata=metadata), None
            except grpc.aio.AioRpcError as error:
                return error.code(), error.details()
    finally:
        await server.stop(0)


@pytest.mark.parametrize("method", ["ModelInfo", "GenerateStream"])
def test_unexpected_errors_become_internal_without_internals(method, caplog):
    code, details = asyncio.run(call([HygieneInterceptor()], method))
    assert code == grpc.StatusCode.INTERNAL
    assert "/" not in details and "0x" not in details and "Traceback" not in details and "id " in details
    assert any("error" in r.message for r in caplog.records)  # the details went to the log


def test_chosen_statuses_pass_through():
    assert asyncio.run(call([HygieneInterceptor()], "Tokenize")) == (grpc.StatusCode.FAILED_PRECONDITION, "chosen status")


def test_auth_refuses_without_the_key_and_admits_with_it():
    auth = AuthInterceptor(ApiKeys(["k1", "k2"]), exempt_services=[])
    assert asyncio.run(call([auth, HygieneInterceptor()], "Tokenize"))[0] == grpc.StatusCode.UNAUTHENTICATED
    ok = asyncio.run(call([auth, HygieneInterceptor()], "Tokenize", (("authorization", "Bearer k2"),)))
    assert ok[0] == grpc.StatusCode.FAILED_PRECONDITION  # reached the servicer
    with pytest.raises(ValueError, match="no key"):
        ApiKeys([])


class TenantEcho(inference_pb2_grpc.InferenceServicer):
    async def Tokenize(self, request, context):
        return inference_pb2.TokenizeResponse(text=str(current_tenant()))

    async def GenerateStream(self, request, context):
        task = asyncio.create_task(asyncio.sleep(0, current_tenant()))  # tasks the handler starts see it too
        yield inference_pb2.GenerateStreamResponse(text=str(await task))


async def tenants_seen(auth, keys):
    server = grpc.aio.server(interceptors=[auth, HygieneInterceptor()])
    inference_pb2_grpc.add_InferenceServicer_to_server(TenantEcho(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            seen = []
            for key in keys:
                metadata = (("authorization", f"Bearer {key}"),)
                unary = (await stub.Tokenize(inference_pb2.TokenizeRequest(), metadata=metadata)).text
                [streamed] = [m.text async for m in stub.GenerateStream(inference_pb2.GenerateRequest(), metadata=metadata)]
                assert unary == streamed
                seen.append(unary)
            return seen
    finally:
        await server.stop(0)


def test_auth_makes_the_keys_opaque_tenant_id_current_for_the_handler():
    auth = AuthInterceptor(ApiKeys(["key-one", "key-two"]), exempt_services=[])
    one, two, one_again = asyncio.run(tenants_seen(auth, ["key-one", "key-two", "key-one"]))
    assert one == one_again != two and len(one) == 16 and "key" not in one
    [fresh] = asyncio.run(tenants_seen(AuthInterceptor(ApiKeys(["key-one"]), exempt_services=[]), ["key-one"]))
    assert fresh != one  # keyed by a secret drawn per gateway: not a plain hash of the key
