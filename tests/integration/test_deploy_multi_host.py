"""The multi-host overlay's LeaderWorkerSet group run here as two "nodes": the leader pod's
driver sidecar and the worker pod's shard container are the two `torchrun --nnodes 2` launches
(over loopback, gloo), the leader's gateway container joins once the driver's startup probe
passes, and the replica serves the same greedy tokens as a one-process server on the same model.

Each line is the manifest's own, as the kubelet expands it, with only what is cluster-specific
replaced: what LeaderWorkerSet injects (the leader's address is 127.0.0.1, the worker index is
the pod's), the downward API, ports, the mounted Secret's paths (a throwaway CA's certificates
for the mutual TLS of the driver link), the collector (none), the model (builtin:tiny) and the
GPUs per pod (one process per "node" here). So the replica runs tp 1 × pp 2: one pipeline stage
per node, as the manifest lays out tp × pp on real hosts.
"""

import os
import signal
import subprocess

from certs import CertificateAuthority
from manifests import (
    DOCKERFILES,
    Local,
    containers,
    entrypoint,
    exec_probe_succeeds,
    grpc_probe_serving,
    only,
    pod_templates,
    render_overlay,
    wait_for_probe,
)
from servers import start_server

from shardgate.clients import Client
from shardgate.proto.common import free_port

SECRET = "/etc/shardgate/replica-tls"
PROMPT = "two pods"


def launch(argv: list[str], env: dict[str, str], log_path) -> subprocess.Popen:
    """Runs a shard launch as deployed, but eager: compiling the decode step would only slow the test."""
    with open(log_path, "wb") as log:
        return subprocess.Popen([*argv, "--no-compile"], env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)


def test_leaderworkerset_group_serves_as_two_torchrun_nodes(tmp_path):
    docs = render_overlay("multi-host")
    size = only(docs, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]["size"]
    templates = pod_templates(docs)
    leader = templates["LeaderWorkerSet/shardgate/leader"]
    driver, gateway = containers(leader["spec"])["driver"], containers(leader["spec"])["gateway"]
    (shard,) = templates["LeaderWorkerSet/shardgate/worker"]["spec"]["containers"]
    assert size == 2

    reference = start_server(tmp_path, "--kv-cache-memory", str(16 << 20))
    try:
        with reference.client() as client:
            expected = client.generate(PROMPT, max_new_tokens=8, temperature=0, ignore_eos=True).token_ids
    finally:
        reference.stop()

    ca = CertificateAuthority(tmp_path, "ca")
    replica_cert = ca.issue("replica")  # names 127.0.0.1; good for the driver and the gateway
    driver_port, grpc_port = free_port(), free_port()
    values = {
        "0.0.0.0": "127.0.0.1",
        "29500": str(free_port()),
        "50051": str(grpc_port),
        "9464": str(free_port()),
        "8000": str(free_port()),
        "50100": str(driver_port),
        "127.0.0.1:50100": f"127.0.0.1:{driver_port}",
        f"{SECRET}/ca.crt": str(ca.cert),
        f"{SECRET}/tls.crt": str(replica_cert.cert),
        f"{SECRET}/tls.key": str(replica_cert.key),
        "http://otel-collector.observability.svc:4317": "",  # no collector: tracing off
    }

    def pod(worker_index: int) -> Local:
        return Local(
            values=values,
            env={"SHARDGATE_MODEL": "builtin:tiny", "SHARDGATE_GPUS_PER_POD": "1"},
            downward={"POD_NAME": f"shardgate-0-{worker_index}", "POD_NAMESPACE": "inference", "NODE_NAME": f"node-{worker_index}"},
            injected={"LWS_LEADER_ADDRESS": "127.0.0.1", "LWS_GROUP_SIZE": str(size), "LWS_WORKER_INDEX": str(worker_index)},
        )

    leader_pod, worker_pod = pod(0), pod(1)
    image = entrypoint(DOCKERFILES["cuda"])
    driver_argv, driver_env = leader_pod.command(driver, image)
    gateway_argv, gateway_env = leader_pod.command(gateway, image)
    shard_argv, shard_env = worker_pod.command(shard, image)
    for argv in (driver_argv, gateway_argv, shard_argv):
        assert not any("$(" in word for word in argv)
    assert driver_env["OMP_NUM_THREADS"] == shard_env["OMP_NUM_THREADS"] == "1"

    processes = {
        "driver": launch(driver_argv, driver_env, tmp_path / "driver.log"),
        "shard": launch(shard_argv, shard_env, tmp_path / "shard.log"),
    }
    try:
        # the gateway container starts once its sidecar's startup probe passes
        wait_for_probe(lambda: exec_probe_succeeds(driver["startupProbe"], leader_pod, driver_env), processes, tmp_path)
        processes["gateway"] = launch(gateway_argv, gateway_env, tmp_path / "gateway.log")
        wait_for_probe(lambda: grpc_probe_serving(gateway["startupProbe"], leader_pod), processes, tmp_path)
        assert not leader_pod.unused()
        assert grpc_probe_serving(gateway["readinessProbe"], leader_pod) and grpc_probe_serving(gateway["livenessProbe"], leader_pod)
        with Client(f"127.0.0.1:{grpc_port}", timeout=120) as client:
            info = client.model_info()
            result = client.generate(PROMPT, max_new_tokens=8, temperature=0, ignore_eos=True)
        assert (info.tp, info.pp, info.replicas) == (1, 2, 1) and len(info.devices) == 2
        assert result.token_ids == expected

        processes["gateway"].send_signal(signal.SIGTERM)
        assert processes["gateway"].wait(leader["spec"]["terminationGracePeriodSeconds"]) == 0
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.terminate()
        for process in processes.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
