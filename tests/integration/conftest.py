import pytest
from servers import start_server


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    """A gateway + shard on the built-in model, shared by a test module."""
    server = start_server(tmp_path_factory.mktemp("logs"), "--model", "builtin:tiny", "--kv-cache-memory", str(64 << 20))
    yield server
    server.stop()


@pytest.fixture
def client(tiny_server):
    with tiny_server.client() as client:
        yield client


@pytest.fixture
def stub(tiny_server):
    """A bare Inference stub on the shared server (servers.raw_stub), for raw protobuf calls."""
    with tiny_server.raw_stub() as stub:
        yield stub
