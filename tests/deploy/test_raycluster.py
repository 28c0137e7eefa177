"""deploy/k8s/extras/raycluster.yaml: the RayCluster against KubeRay's own v1 CRD schema (vendored
in tests/deploy/crds), each pod template as a real Kubernetes pod template (strict), and the head's
`tandem worker` command parsed by the worker's own config: a Ray group as big as the cluster's GPUs,
rank 0 on the head with the gRPC port and the probes."""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from services.common.config import parse_config
from services.worker.config import WorkerConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
MANIFEST = REPO_ROOT / "deploy" / "k8s" / "extras" / "raycluster.yaml"
SCHEMA = Path(__file__).resolve().parent / "crds" / "ray.io_rayclusters.v1.schema.json"


def _docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def _cluster() -> dict[str, Any]:
    (cluster,) = [d for d in _docs() if d["kind"] == "RayCluster"]
    return cluster


def _strict(schema: Any) -> Any:
    """The schema with unknown fields refused (the API server prunes them silently, which would hide
    a typo): every object that lists its properties gets additionalProperties false."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _schema() -> dict[str, Any]:
    return dict(_strict(json.loads(SCHEMA.read_text())))


def _as_deployment(template: dict[str, Any]) -> dict[str, Any]:
    labels = {"x": "y"}
    template = {
        **template,
        "metadata": {**template["metadata"], "labels": {**labels, **template["metadata"].get("labels", {})}},
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "check", "namespace": "tandem"},
        "spec": {"selector": {"matchLabels": labels}, "template": template},
    }


def test_raycluster_matches_kuberays_schema_and_pod_templates_validate() -> None:
    cluster = _cluster()
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    schema = _schema()
    jsonschema.validate(cluster, schema)
    spec = cluster["spec"]
    for template in [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]:
        kubernetes_validate.validate(_as_deployment(template), "1.33", strict=True)
    for doc in _docs():
        if doc["kind"] != "RayCluster":
            kubernetes_validate.validate(doc, "1.33", strict=True)
    typo = copy.deepcopy(cluster)
    typo["spec"]["workerGroupSpecs"][0]["replica"] = 1  # not a field: the strict schema refuses it
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(typo, schema)
    bad = copy.deepcopy(cluster)
    bad["spec"]["workerGroupSpecs"][0]["replicas"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def _gpus(template: dict[str, Any]) -> int:
    return int(template["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])


def test_head_runs_ray_then_rank_0_of_a_group_as_big_as_the_clusters_gpus() -> None:
    spec = _cluster()["spec"]
    head = spec["headGroupSpec"]["template"]
    # KubeRay leaves the head's command alone only with this annotation; the script runs its
    # generated `ray start` without --block, then tandem as the container's main process
    assert head["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    container = head["spec"]["containers"][0]
    (script,) = container["args"]
    start, _, tandem = script.partition("&& exec ")
    assert "${KUBERAY_GEN_RAY_START_CMD/--block/}" in start
    argv = shlex.split(tandem)
    assert argv[:2] == ["tandem", "worker"]
    config = parse_config(WorkerConfig, argv[2:], "tandem worker")
    assert config.distributed_executor_backend == "ray" and config.ray_address == "auto"
    gpus = _gpus(head) + sum(_gpus(g["template"]) * g["replicas"] for g in spec["workerGroupSpecs"])
    assert config.world_size == gpus  # one rank per GPU of the cluster
    assert all(g["minReplicas"] == g["replicas"] == g["maxReplicas"] for g in spec["workerGroupSpecs"])
    port = int(config.address.rpartition(":")[2])
    assert {"name": "grpc", "containerPort": port, "protocol": "TCP"} in container["ports"]
    assert container["readinessProbe"]["grpc"]["port"] == port
    (service,) = [d for d in _docs() if d["kind"] == "Service"]
    assert service["spec"]["selector"].items() <= head["metadata"]["labels"].items()
    worker_labels = spec["workerGroupSpecs"][0]["template"]["metadata"]["labels"]
    assert not service["spec"]["selector"].items() <= worker_labels.items()
