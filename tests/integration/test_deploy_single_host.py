"""The single-host Deployment's container run here as the kubelet would start it: the cpu
overlay's command line and env (the gpu and spot overlays run the same line; only env values and
resources differ), with only the model, ports, addresses, the collector's endpoint and the
downward API replaced. Its flags exist, its gRPC probes see SERVING for the services they name,
its metrics port serves Prometheus text, its spans reach the collector under the service name
its env gives, and SIGTERM drains it within the pod's grace period."""

import os
import signal
import subprocess
import urllib.request

from manifests import DOCKERFILES, Local, containers, entrypoint, grpc_probe_serving, pod_templates, render_overlay, wait_for_probe
from otlp_receiver import otlp_receiver

from shardgate.clients import Client
from shardgate.proto.common import free_port


def test_deployment_container_serves_as_deployed(tmp_path):
    docs = render_overlay("cpu")
    template = pod_templates(docs)["Deployment/shardgate"]
    (container,) = template["spec"]["containers"]
    assert containers(template["spec"]) == {"shardgate": container}
    grpc_port, metrics_port, http_port = free_port(), free_port(), free_port()
    with otlp_receiver() as (collector, spans):
        local = Local(
            values={
                "0.0.0.0": "127.0.0.1",
                "50051": str(grpc_port),
                "9464": str(metrics_port),
                "8000": str(http_port),
                "http://otel-collector.observability.svc:4317": collector,
            },
            env={"SHARDGATE_MODEL": "builtin:tiny"},
            downward={"OMP_NUM_THREADS": "1", "POD_NAME": "shardgate-5d8c9-x7k2p", "POD_NAMESPACE": "inference", "NODE_NAME": "node-a"},
        )
        argv, env = local.command(container, entrypoint(DOCKERFILES["cpu"]))
        assert not local.unused() and not any("$(" in word for word in argv)
        assert env["OTEL_RESOURCE_ATTRIBUTES"] == "k8s.pod.name=shardgate-5d8c9-x7k2p,k8s.namespace.name=inference,k8s.node.name=node-a"
        with open(tmp_path / "gateway.log", "wb") as log:
            # As deployed, but eager: compiling the decode step would only slow the test.
            gateway = subprocess.Popen([*argv, "--no-compile"], env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_probe(lambda: grpc_probe_serving(container["startupProbe"], local), {"gateway": gateway}, tmp_path)
            assert grpc_probe_serving(container["readinessProbe"], local)
            assert grpc_probe_serving(container["livenessProbe"], local)
            with Client(f"127.0.0.1:{grpc_port}", timeout=60) as client:
                assert len(client.generate("deployed", max_new_tokens=4, ignore_eos=True).token_ids) == 4
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=10) as response:
                assert response.status == 200  # the OpenAI-compatible HTTP API the Service exposes
            annotations = template["metadata"]["annotations"]
            scraped = f"http://127.0.0.1:{local.swap(annotations['prometheus.io/port'])}{annotations['prometheus.io/path']}"
            with urllib.request.urlopen(scraped, timeout=10) as response:
                assert b"# TYPE shardgate_" in response.read()
            spans.wait_for(lambda received: any(span.service == "shardgate-gateway" for span in received))

            gateway.send_signal(signal.SIGTERM)  # what the kubelet sends first
            assert gateway.wait(template["spec"]["terminationGracePeriodSeconds"]) == 0
        finally:
            if gateway.poll() is None:
                gateway.kill()
                gateway.wait()
