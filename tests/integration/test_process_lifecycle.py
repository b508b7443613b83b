"""The gateway owns its shard processes: they stop with it, however it stops."""

import signal

from processes import children_of, wait_gone
from servers import start_server


def test_shards_exit_when_the_gateway_is_killed(tmp_path):
    server = start_server(tmp_path, "--kv-cache-memory", str(16 << 20))
    shards = children_of(server.process.pid)
    assert len(shards) == 1
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    assert wait_gone(shards, 10) == []


def test_sigterm_stops_gateway_and_shards(tmp_path):
    server = start_server(tmp_path, "--kv-cache-memory", str(16 << 20))
    shards = children_of(server.process.pid)
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(30) == 0
    assert wait_gone(shards, 10) == []
