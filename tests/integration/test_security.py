"""TLS, mutual TLS, API keys, and what a caller may learn from an error."""

import subprocess
import sys

import grpc
import pytest
from certs import CertificateAuthority
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from servers import start_server

from shardgate.proto import inference_pb2, inference_pb2_grpc, shard_pb2
from shardgate.proto.common import free_port

KV = str(16 << 20)
HEALTH = "grpc.health.v1.Health"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    ca, other_ca = CertificateAuthority(directory, "ca"), CertificateAuthority(directory, "other-ca")
    return dict(ca=ca, other_ca=other_ca, server=ca.issue("server"), client=ca.issue("client"), stranger=other_ca.issue("stranger"))


def info(channel: grpc.Channel, metadata=()):
    return inference_pb2_grpc.InferenceStub(channel).ModelInfo(inference_pb2.ModelInfoRequest(), timeout=10, metadata=metadata)


def test_mutual_tls_admits_only_clients_of_the_trusted_ca(pki, tmp_path):
    ca_pem = pki["ca"].cert.read_bytes()
    good = grpc.ssl_channel_credentials(ca_pem, *pki["client"].pair)
    server = start_server(
        tmp_path,
        "--kv-cache-memory",
        KV,
        "--tls-cert",
        str(pki["server"].cert),
        "--tls-key",
        str(pki["server"].key),
        "--tls-client-ca",
        str(pki["ca"].cert),
        credentials=good,
    )
    try:
        with grpc.secure_channel(server.address, good) as channel:
            assert info(channel).model == "builtin:tiny"
        with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as plaintext:
            info(channel)
        assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE
        stranger = grpc.ssl_channel_credentials(ca_pem, *pki["stranger"].pair)
        with grpc.secure_channel(server.address, stranger) as channel, pytest.raises(grpc.RpcError) as foreign:
            info(channel)
        assert foreign.value.code() == grpc.StatusCode.UNAVAILABLE
        with grpc.secure_channel(server.address, grpc.ssl_channel_credentials(ca_pem)) as channel, pytest.raises(grpc.RpcError):
            info(channel)  # no client certificate at all
    finally:
        server.stop()


def _call(channel: grpc.Channel, method: str, client_streaming: bool, server_streaming: bool, metadata):
    kind = ("stream" if client_streaming else "unary") + "_" + ("stream" if server_streaming else "unary")
    call = getattr(channel, kind)(method, request_serializer=None, response_deserializer=None)
    request = iter([b""]) if client_streaming else b""
    result = call(request, timeout=10, metadata=metadata)
    if server_streaming:
        for _ in result:  # the first message answers (Health.Watch streams until cancelled)
            result.cancel()
            break


def test_every_method_but_health_needs_a_valid_api_key(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("first-key\n\nsecond-key\n")
    server = start_server(tmp_path, "--kv-cache-memory", KV, "--api-key-file", str(keys))
    good = (("authorization", "Bearer second-key"),)
    try:
        with grpc.insecure_channel(server.address) as channel:
            assert info(channel, good).model == "builtin:tiny"
            services = ProtoReflectionDescriptorDatabase(channel)
            # the reflection service itself needs the key too
            with pytest.raises(grpc.RpcError) as listing:
                services.get_services()
            assert listing.value.code() == grpc.StatusCode.UNAUTHENTICATED
            authed = grpc.intercept_channel(channel, _MetadataAdder(good))
            database = ProtoReflectionDescriptorDatabase(authed)
            names = database.get_services()
            assert {"shardgate.v1.Inference", HEALTH, "grpc.reflection.v1alpha.ServerReflection"} <= set(names)
            checked = 0
            for service_name in names:
                service = database.FindFileContainingSymbol(service_name)
                descriptor = next(s for s in service.service if f"{service.package}.{s.name}" == service_name)
                for method in descriptor.method:
                    path = f"/{service_name}/{method.name}"
                    for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", "second-key"),)):
                        try:
                            _call(channel, path, method.client_streaming, method.server_streaming, metadata)
                            code = grpc.StatusCode.OK
                        except grpc.RpcError as error:
                            code = error.code()
                        if service_name == HEALTH:
                            assert code != grpc.StatusCode.UNAUTHENTICATED, path
                        else:
                            assert code == grpc.StatusCode.UNAUTHENTICATED, (path, metadata)
                            checked += 1
            assert checked >= 3 * 7
    finally:
        server.stop()


class _MetadataAdder(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, metadata):
        self.metadata = metadata

    def _details(self, details):
        return details._replace(metadata=tuple(details.metadata or ()) + self.metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._details(details), requests)


def test_malformed_request_bytes_are_invalid_argument_without_internals(tiny_server):
    # field 2 (prompt, a string) holding bytes that are not UTF-8
    raw = b"\x12\x02\xff\xfe" + b"\x20\x04"
    with grpc.insecure_channel(tiny_server.address) as channel:
        for method in ("/shardgate.v1.Inference/Generate", "/shardgate.v1.Inference/GenerateStream"):
            call = channel.unary_stream(method) if method.endswith("Stream") else channel.unary_unary(method)
            with pytest.raises(grpc.RpcError) as raised:
                result = call(raw, timeout=10)
                if method.endswith("Stream"):
                    list(result)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert raised.value.details().startswith("request: ")
    assert tiny_server.process.poll() is None


def test_remote_replica_link_is_mutual_tls(pki, tmp_path):
    ca, server_cert, client_cert = pki["ca"], pki["server"], pki["client"]
    driver = f"127.0.0.1:{free_port()}"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "1",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "-m",
        "shardgate.shards.main",
        "--no-compile",
        "--model",
        "builtin:tiny",
        "--listen",
        driver,
        "--kv-cache-memory",
        KV,
        "--tls-cert",
        str(server_cert.cert),
        "--tls-key",
        str(server_cert.key),
        "--tls-client-ca",
        str(ca.cert),
    ]
    with open(tmp_path / "node.log", "wb") as log:
        node = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        server = start_server(
            tmp_path,
            "--replicas",
            "0",
            "--remote-replica",
            driver,
            "--replica-tls-ca",
            str(ca.cert),
            "--replica-tls-cert",
            str(client_cert.cert),
            "--replica-tls-key",
            str(client_cert.key),
        )
        try:
            with server.client() as client:
                assert len(client.generate("over tls", max_new_tokens=4, ignore_eos=True).token_ids) == 4
        finally:
            server.stop()
        # without a client certificate the driver refuses the connection
        with grpc.secure_channel(driver, grpc.ssl_channel_credentials(ca.cert.read_bytes())) as channel:
            describe = channel.unary_unary(
                "/shardgate.shard.v1.Shard/Describe", response_deserializer=shard_pb2.DescribeResponse.FromString
            )
            with pytest.raises(grpc.RpcError) as refused:
                describe(b"", timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        node.terminate()
        node.wait(30)
