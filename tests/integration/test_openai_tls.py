"""The OpenAI HTTP port under --tls-cert/--tls-key speaks HTTPS only, with the gRPC port's
certificate; the bench's openai driver connects with the CA of --ca-cert."""

import asyncio
import ssl

import grpc
import openai
import pytest
from certs import CertificateAuthority
from servers import start_server

from shardgate.clients.connection import TLS
from shardgate.clients.tools.protocols import OpenAIDriver
from shardgate.clients.tools.workload import WorkItem
from shardgate.proto.common import free_port


def test_https_only_and_the_bench_driver_over_it(tmp_path):
    ca = CertificateAuthority(tmp_path, "ca")
    issued = ca.issue("server")
    http_port = free_port()
    flags = [
        "--http-port",
        str(http_port),
        "--tls-cert",
        str(issued.cert),
        "--tls-key",
        str(issued.key),
        "--kv-cache-memory",
        str(16 << 20),
    ]
    server = start_server(tmp_path, *flags, credentials=grpc.ssl_channel_credentials(ca.cert.read_bytes()))
    try:
        trusted = ssl.create_default_context(cafile=str(ca.cert))
        with openai.OpenAI(
            base_url=f"https://127.0.0.1:{http_port}/v1",
            api_key="none",
            max_retries=0,
            http_client=openai.DefaultHttpxClient(verify=trusted),
        ) as client:
            assert [m.id for m in client.models.list().data] == ["builtin:tiny"]
        with openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="none", max_retries=0, timeout=10) as plain:
            with pytest.raises(openai.APIConnectionError):
                plain.models.list()

        async def drive() -> int:
            options = {"tls": TLS(root_certificates=ca.cert), "timeout": 30}
            async with OpenAIDriver(f"127.0.0.1:{http_port}", options) as driver:
                return sum([count async for count in driver.stream(WorkItem([], 5, "hello there"), ignore_eos=True)])

        assert asyncio.run(drive()) == 5
    finally:
        server.stop()
