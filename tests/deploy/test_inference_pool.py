"""deploy/k8s/extras/inference-pool.yaml against the upstream InferencePool CRD's v1 schema."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD = Path(__file__).resolve().parent / "crds" / "inference.networking.k8s.io_inferencepools.yaml"
POOL = REPO_ROOT / "deploy" / "k8s" / "extras" / "inference-pool.yaml"


def _schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    [v1] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return dict(v1["schema"]["openAPIV3Schema"])


def _pool() -> dict[str, Any]:
    return dict(yaml.safe_load(POOL.read_text()))


def test_inference_pool_matches_the_upstream_schema() -> None:
    pool = _pool()
    assert (pool["apiVersion"], pool["kind"]) == ("inference.networking.k8s.io/v1", "InferencePool")
    jsonschema.validate(pool, _schema())


def test_inference_pool_selects_the_gateway_pods_on_their_http_port() -> None:
    pool = _pool()
    gateway = next(
        d
        for d in yaml.safe_load_all((REPO_ROOT / "deploy" / "k8s" / "base" / "gateway.yaml").read_text())
        if d and d["kind"] == "Deployment"
    )
    labels = gateway["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {p["containerPort"] for p in gateway["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [8000] and 8000 in ports
    kustomization = yaml.safe_load((REPO_ROOT / "deploy" / "k8s" / "base" / "kustomization.yaml").read_text())
    assert pool["metadata"]["namespace"] == kustomization["namespace"]  # selectors do not cross namespaces


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
