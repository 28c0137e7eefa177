"""deploy/k8s/extras/inference-pool.yaml: the InferencePool against the upstream CRD's v1 schema,
the pool pods and tandem's Endpoint Picker against Kubernetes' schemas, and the wiring between them
(the picker follows the pool's workers and answers with the port the pool targets)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from gateway.epp import SERVICE_NAME
from gateway.epp_main import EppConfig
from services.common.config import parse_config

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD = Path(__file__).resolve().parent / "crds" / "inference.networking.k8s.io_inferencepools.yaml"
POOL = REPO_ROOT / "deploy" / "k8s" / "extras" / "inference-pool.yaml"


def _schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    [v1] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return dict(v1["schema"]["openAPIV3Schema"])


def _documents() -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> document."""
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(POOL.read_text()) if d}


def _pool() -> dict[str, Any]:
    return _documents()[("InferencePool", "tandem")]


def _containers(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}


def test_inference_pool_matches_the_upstream_schema() -> None:
    pool = _pool()
    assert (pool["apiVersion"], pool["kind"]) == ("inference.networking.k8s.io/v1", "InferencePool")
    jsonschema.validate(pool, _schema())


def test_the_rest_passes_kubernetes_schemas() -> None:
    docs = [d for key, d in _documents().items() if key[0] != "InferencePool"]
    assert {d["kind"] for d in docs} == {"Deployment", "Service"}
    for doc in docs:
        kubernetes_validate.validate(doc, "1.33", strict=True)
        assert doc["metadata"]["namespace"] == _pool()["metadata"]["namespace"]


def test_pool_members_are_workers_each_with_a_gateway_on_the_target_port() -> None:
    pool, docs = _pool(), _documents()
    members = docs[("Deployment", "tandem-pool-worker")]
    assert (
        pool["spec"]["selector"]["matchLabels"].items()
        <= members["spec"]["template"]["metadata"]["labels"].items()
    )
    containers = _containers(members)
    [target] = [p["number"] for p in pool["spec"]["targetPorts"]]
    assert {p["containerPort"] for p in containers["gateway"]["ports"]} == {target}
    gateway_args = containers["gateway"]["args"]
    worker_port = containers["worker"]["ports"][0]["containerPort"]
    assert gateway_args[gateway_args.index("--worker") + 1] == f"127.0.0.1:{worker_port}"
    kustomization = yaml.safe_load((REPO_ROOT / "deploy" / "k8s" / "base" / "kustomization.yaml").read_text())
    assert pool["metadata"]["namespace"] == kustomization["namespace"]  # selectors do not cross namespaces


def test_pool_points_at_tandems_picker_wired_to_the_members() -> None:
    pool, docs = _pool(), _documents()
    ref = pool["spec"]["endpointPickerRef"]
    service = docs[("Service", ref["name"])]
    [port] = service["spec"]["ports"]
    assert port["port"] == ref["port"]["number"] and port["appProtocol"] == "http2"
    epp = docs[("Deployment", ref["name"])]
    assert service["spec"]["selector"].items() <= epp["spec"]["template"]["metadata"]["labels"].items()
    container = _containers(epp)["epp"]
    args = container["args"]
    assert args[0] == "epp"
    config = parse_config(EppConfig, args[1:], "tandem epp", env={})  # the real CLI accepts them
    assert config.address.endswith(f":{container['ports'][0]['containerPort']}")
    assert config.endpoint_port == pool["spec"]["targetPorts"][0]["number"]
    members = docs[("Service", "tandem-pool-worker")]
    assert members["spec"]["clusterIP"] == "None"  # dns: resolves to every ready pod
    assert config.worker == [f"dns:tandem-pool-worker:{members['spec']['ports'][0]['port']}"]
    assert container["readinessProbe"]["grpc"]["service"] == "readiness"
    assert container["livenessProbe"]["grpc"]["service"] == "liveness"
    assert SERVICE_NAME == "envoy.service.ext_proc.v3.ExternalProcessor"


@pytest.mark.parametrize(
    "path, value",
    [
        (("spec", "targetPorts"), [{"number": 0}]),
        (("spec", "endpointPickerRef", "failureMode"), "FailSometimes"),
        (("spec", "appProtocol"), "grpc"),
        (("spec", "selector"), {"matchLabels": {}}),
    ],
)
def test_schema_catches_mistakes(path: tuple[str, ...], value: Any) -> None:
    pool = copy.deepcopy(_pool())
    node = pool
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(pool, _schema())
