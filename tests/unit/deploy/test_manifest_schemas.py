"""Every manifest the overlays render is valid, checked offline: built-in kinds against the
Kubernetes schemas kubernetes-validate ships (strict: no unknown field), on the oldest release
the recipes support and the newest; custom resources against their published CRD schemas
(deploy/schemas), with unknown fields refused as the API server's strict field validation
refuses them, and a LeaderWorkerSet's pod templates against the core PodTemplate schema too."""

import copy
import json
from functools import cache

import jsonschema
import kubernetes_validate
import pytest
from manifests import DEPLOY, OVERLAYS, render_overlay

# 1.30: the first release with sidecar containers and the preStop sleep action on by default
KUBERNETES_VERSIONS = ["1.30", "1.37"]
CRD_SCHEMAS = {
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): "leaderworkerset.x-k8s.io_v1_leaderworkerset.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_v1_servicemonitor.json",
}


def strict(schema):
    """The CRD schema refusing unknown fields (where it does not preserve them)."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {key: strict(value) for key, value in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        schema["additionalProperties"] = False
    return schema


@cache
def crd_validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    schema = strict(json.loads((DEPLOY / "schemas" / CRD_SCHEMAS[api_version, kind]).read_text()))
    return jsonschema.Draft7Validator(schema)


def validate(manifest: dict) -> None:
    """Raises a ValidationError naming what is wrong; SchemaNotFoundError for an unknown kind."""
    key = (manifest["apiVersion"], manifest["kind"])
    if key not in CRD_SCHEMAS:
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(manifest, version, strict=True)
        return
    crd_validator(*key).validate(manifest)
    if manifest["kind"] == "LeaderWorkerSet":
        group = manifest["spec"]["leaderWorkerTemplate"]
        for role in ("leaderTemplate", "workerTemplate"):
            pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": role.lower()}, "template": group[role]}
            validate(pod_template)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_manifests_validate(overlay):
    for manifest in render_overlay(overlay):
        try:
            validate(manifest)
        except jsonschema.ValidationError as error:
            path = ".".join(str(part) for part in error.absolute_path)
            pytest.fail(f"{overlay}: {manifest['kind']}/{manifest['metadata']['name']} at {path}: {error.message}")


def manifest(overlay: str, kind: str) -> dict:
    (found,) = [m for m in render_overlay(overlay) if m["kind"] == kind]
    return copy.deepcopy(found)


@pytest.mark.parametrize(
    ("overlay", "kind", "spoil"),
    [
        # a misspelt field of a built-in kind
        ("cpu", "Deployment", lambda m: m["spec"]["template"]["spec"].update(terminationGracePeriod=45)),
        # a probe port given by name (gRPC probes take a number)
        ("cpu", "Deployment", lambda m: m["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpc"].update(port="grpc")),
        # a misspelt field of the LeaderWorkerSet itself, and one inside its worker pods
        ("multi-host", "LeaderWorkerSet", lambda m: m["spec"]["leaderWorkerTemplate"].update(groupSize=2)),
        ("multi-host", "LeaderWorkerSet", lambda m: m["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"].update(hostname=1)),
        ("multi-host", "LeaderWorkerSet", lambda m: m["spec"]["leaderWorkerTemplate"].update(restartPolicy="Always")),
        ("gpu", "ServiceMonitor", lambda m: m["spec"]["endpoints"][0].update(scrapeInterval="15s")),
    ],
)
def test_validation_refuses_a_spoilt_manifest(overlay, kind, spoil):
    spoilt = manifest(overlay, kind)
    validate(copy.deepcopy(spoilt))  # valid as rendered
    spoil(spoilt)
    with pytest.raises(jsonschema.ValidationError):
        validate(spoilt)
