"""deploy/k8s/extras/leaderworkerset.yaml: the LeaderWorkerSet's own fields against a schema of
the LWS v1 API (the CRD is not in kubernetes-validate), each pod template as a real Kubernetes
pod template (strict), and the worker options parsed by `tandem worker`'s own config."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from services.common.config import parse_config
from services.worker.config import WorkerConfig

MANIFEST = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "extras" / "leaderworkerset.yaml"

# The parts of leaderworkerset.x-k8s.io/v1 this manifest uses (field names and enums from the API).
LWS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "leaderworkerset.x-k8s.io/v1"},
        "kind": {"const": "LeaderWorkerSet"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["leaderWorkerTemplate"],
            "properties": {
                "replicas": {"type": "integer", "minimum": 0},
                "startupPolicy": {"enum": ["LeaderCreated", "LeaderReady"]},
                "rolloutStrategy": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "type": {"const": "RollingUpdate"},
                        "rollingUpdateConfiguration": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {"maxUnavailable": {}, "maxSurge": {}},
                        },
                    },
                },
                "leaderWorkerTemplate": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["size", "workerTemplate"],
                    "properties": {
                        "size": {"type": "integer", "minimum": 1},
                        "restartPolicy": {"enum": ["RecreateGroupOnPodRestart", "None"]},
                        "leaderTemplate": {"type": "object"},
                        "workerTemplate": {"type": "object"},
                    },
                },
            },
        },
    },
}


def _docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def _lws() -> dict[str, Any]:
    (lws,) = [d for d in _docs() if d["kind"] == "LeaderWorkerSet"]
    return lws


def _as_deployment(template: dict[str, Any]) -> dict[str, Any]:
    labels = {"x": "y"}
    template = {
        **template,
        "metadata": {**template.get("metadata", {}), "labels": {**labels, **template["metadata"]["labels"]}},
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "check", "namespace": "tandem"},
        "spec": {"selector": {"matchLabels": labels}, "template": template},
    }


def test_leaderworkerset_and_its_pod_templates_validate() -> None:
    lws = _lws()
    jsonschema.validate(lws, LWS_SCHEMA)
    spec = lws["spec"]["leaderWorkerTemplate"]
    for template in (spec["leaderTemplate"], spec["workerTemplate"]):
        kubernetes_validate.validate(_as_deployment(template), "1.33", strict=True)
    for doc in _docs():
        if doc["kind"] != "LeaderWorkerSet":
            kubernetes_validate.validate(doc, "1.33", strict=True)
    bad = _lws()
    bad["spec"]["leaderWorkerTemplate"]["restartPolicy"] = "Always"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, LWS_SCHEMA)


def _worker_args(template: dict[str, Any], index: int) -> list[str]:
    """The container's args as the pod would run them, LWS's variables filled in."""
    env = {"LWS_GROUP_SIZE": str(_lws()["spec"]["leaderWorkerTemplate"]["size"]), "LWS_WORKER_INDEX": str(index),
           "LWS_LEADER_ADDRESS": "tandem-worker-tp-0.tandem-worker-tp.tandem"}  # fmt: skip
    args: list[str] = template["spec"]["containers"][0]["args"]
    assert args[0] == "worker"
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], a) for a in args[1:]]


def test_group_is_one_worker_with_a_serving_leader_and_headless_workers() -> None:
    spec = _lws()["spec"]["leaderWorkerTemplate"]
    assert spec["restartPolicy"] == "RecreateGroupOnPodRestart"  # the group restarts as a unit
    leader = parse_config(WorkerConfig, _worker_args(spec["leaderTemplate"], 0), "tandem worker")
    worker = parse_config(WorkerConfig, _worker_args(spec["workerTemplate"], 1), "tandem worker")
    assert leader.nnodes == worker.nnodes == spec["size"]
    assert (leader.node_rank, worker.node_rank) == (0, 1)
    gpus = int(spec["leaderTemplate"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert leader.world_size == worker.world_size == gpus * spec["size"]  # one rank per GPU
    leader_container = spec["leaderTemplate"]["spec"]["containers"][0]
    assert "readinessProbe" in leader_container and "grpc" in leader_container["readinessProbe"]
    assert "readinessProbe" not in spec["workerTemplate"]["spec"]["containers"][0]
    (service,) = [d for d in _docs() if d["kind"] == "Service"]
    assert service["spec"]["selector"].items() <= spec["leaderTemplate"]["metadata"]["labels"].items()
