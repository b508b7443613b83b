"""The gateway owns its shard processes: they stop with it, however it stops."""

import os
import signal
import time

from servers import start_server


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


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
