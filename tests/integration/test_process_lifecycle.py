"""The gateway owns its shard processes: they stop with it, however it stops."""

import signal
import stat
import tempfile
from pathlib import Path

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


def test_a_killed_gateways_socket_goes_with_its_shards_and_its_folder_at_the_next_start(tmp_path):
    # Where the gateway makes its replicas' folders: a short path, since a unix socket's path is at
    # most 107 bytes and pytest's tmp_path can be longer than that with the folder and socket names.
    temp = Path(tempfile.mkdtemp(prefix="sg-", dir="/tmp"))
    env = {"TMPDIR": str(temp)}
    server = start_server(tmp_path, "--kv-cache-memory", str(16 << 20), env=env)
    [folder] = temp.glob("shardgate-replica*")
    socket = folder / "driver.sock"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and stat.S_IMODE(socket.stat().st_mode) == 0o600  # owner only
    shards = children_of(server.process.pid)
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    assert wait_gone(shards, 10) == []
    assert not socket.exists() and folder.exists()  # the driver removed its socket; the folder is the gateway's

    second = start_server(tmp_path, "--kv-cache-memory", str(16 << 20), env=env)
    try:
        assert not folder.exists() and len(list(temp.glob("shardgate-replica*"))) == 1
    finally:
        second.stop()
    assert list(temp.glob("shardgate-replica*")) == []
    temp.rmdir()
