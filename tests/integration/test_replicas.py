"""Data parallelism behind one gateway, and a replica spanning two torchrun "nodes"."""

import secrets
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from servers import start_server

from shardgate.proto.common import free_port

KV = str(16 << 20)


def test_two_replicas_both_take_work(tmp_path):
    server = start_server(tmp_path, "--replicas", "2", "--kv-cache-memory", KV)
    try:
        with server.client() as client:
            info = client.model_info()
            assert info.replicas == 2 and len(info.kv_capacity_tokens) == 2 and len(info.devices) == 2
            expected = client.generate("replica", max_new_tokens=8, temperature=0, ignore_eos=True).token_ids

        def generate(i):
            with server.client() as c:
                result = c.generate("replica", max_new_tokens=8, temperature=0, ignore_eos=True)
            return result.usage.replica, result.token_ids

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(generate, range(16)))
    finally:
        server.stop()
    assert {replica for replica, _ in results} == {0, 1}
    assert all(tokens == expected for _, tokens in results)  # same model, same greedy output


def torchrun_node(node_rank: int, master_port: int, driver: str, token_file, log_path) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--node-rank",
        str(node_rank),
        "--nproc-per-node",
        "1",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(master_port),
        "-m",
        "shardgate.shards.main",
        "--no-compile",
        "--model",
        "builtin:tiny",
        "--tp",
        "2",
        "--listen",
        driver,
        "--listen-token-file",
        str(token_file),
        "--kv-cache-memory",
        KV,
    ]
    with open(log_path, "wb") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def test_two_node_replica_started_by_torchrun(tmp_path):
    local = start_server(tmp_path, "--kv-cache-memory", KV)
    try:
        with local.client() as client:
            expected = client.generate("two nodes", max_new_tokens=12, temperature=0, ignore_eos=True).token_ids
    finally:
        local.stop()

    master_port, driver = free_port(), f"127.0.0.1:{free_port()}"
    token_file = tmp_path / "link-token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    nodes = [torchrun_node(rank, master_port, driver, token_file, tmp_path / f"node{rank}.log") for rank in range(2)]
    try:
        server = start_server(tmp_path, "--replicas", "0", "--remote-replica", driver, "--replica-token-file", str(token_file))
        try:
            with server.client() as client:
                info = client.model_info()
                result = client.generate("two nodes", max_new_tokens=12, temperature=0, ignore_eos=True)
        finally:
            server.stop()
    finally:
        for node in nodes:
            node.terminate()
        for node in nodes:
            node.wait(30)
    assert (info.tp, info.pp, info.replicas) == (2, 1, 1) and len(info.devices) == 2
    assert result.token_ids == expected
