"""The container and Kubernetes files, checked offline (no Docker engine or cluster here): the
Dockerfile passes hadolint, the compose file and manifests say what README says, and the manifests
validate against Kubernetes' own schemas."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
K8S_VERSION = "1.30"
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002, "openai": 9000}


def test_the_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).with_name("hadolint")
    result = subprocess.run([str(hadolint), "--failure-threshold", "info", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_is_triton_2_51_with_the_package_in_its_python():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM nvcr\.io/nvidia/tritonserver:24\.10-py3$", text, re.M)
    assert re.search(r"^RUN pip install \.$", text, re.M)  # the stub imports bucketserve from the image's Python
    assert "BUCKETSERVE_MODEL_PATH=/models/model" in text
    assert "/v2/health/ready" in text and re.search(r"^EXPOSE 8000 8001 8002 9000$", text, re.M)
    assert "/health" in text and '"--openai-port", "9000"' in text


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_runs_one_gpu_node_with_the_model_mounted(compose):
    service = compose["services"]["bucketserve"]
    assert service["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
    assert (ROOT / service["build"]["context"].replace("..", ".") / service["build"]["dockerfile"]).is_file()
    assert sorted(service["ports"]) == [f"{p}:{p}" for p in sorted(PORTS.values())]
    targets = [volume.rsplit(":", 2)[1] for volume in service["volumes"]]  # SOURCE:TARGET:ro
    assert "/models/model" in targets  # where the image's BUCKETSERVE_MODEL_PATH points
    assert (ROOT / "model_repository" / "bucketserve").is_dir()
    assert service["shm_size"]
    assert "/v2/health/ready" in " ".join(service["healthcheck"]["test"])
    [gpu] = service["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and gpu["count"] == 1 and gpu["capabilities"] == ["gpu"]
    assert any("--http-restricted-api=" in arg for arg in service["command"])


def test_readme_tells_how_to_start_the_container():
    readme = (ROOT / "README.md").read_text()
    assert "docker compose -f docker/compose.yaml up --build" in readme
    assert "kubectl apply -f deploy/kubernetes/" in readme


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict]:
    docs = [yaml.safe_load(path.read_text()) for path in MANIFESTS]
    return {doc["kind"]: doc for doc in docs}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_each_manifest_validates_against_the_kubernetes_schema(path):
    assert kubernetes_validate.validate(yaml.safe_load(path.read_text()), K8S_VERSION, strict=True)


def test_the_validator_catches_a_misspelt_field(manifests):
    broken = copy.deepcopy(manifests["Deployment"])
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_replicas_get_a_gpu_probes_on_both_front_doors_and_shared_memory(manifests):
    pod = manifests["Deployment"]["spec"]["template"]
    [container] = pod["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == PORTS
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "openai"}  # 200 once Triton is too
    assert container["startupProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    env = {e["name"]: e for e in container["env"]}
    assert env["BUCKETSERVE_MODEL_PATH"]["value"] in mounts
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(PORTS["metrics"])


def test_the_service_exposes_http_grpc_metrics_and_openai(manifests):
    service = manifests["Service"]
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == PORTS
    labels = manifests["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


def test_the_autoscaler_scales_the_deployment_on_a_metric_the_server_exports(manifests):
    hpa = manifests["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == manifests["Deployment"]["metadata"]["name"]
    [metric] = hpa["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert name.startswith("bucketserve_")
    assert f'"{name}"' in (ROOT / "backend" / "bucketserve" / "triton" / "metrics.py").read_text()


def test_the_inference_pool_routes_openai_traffic_on_metrics_the_server_exports(manifests):
    gateway = ROOT / "deploy" / "kubernetes" / "inference-gateway"
    pool = yaml.safe_load((gateway / "inferencepool.yaml").read_text())
    values = yaml.safe_load((gateway / "values.yaml").read_text())
    labels = manifests["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert pool["kind"] == "InferencePool" and pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert values["inferencePool"]["modelServers"]["matchLabels"].items() <= labels.items()
    assert pool["spec"]["targetPorts"] == values["inferencePool"]["targetPorts"] == [{"number": PORTS["openai"]}]
    flags = values["inferenceExtension"]["flags"]
    assert flags["model-server-metrics-port"] == PORTS["metrics"]
    exported = (ROOT / "backend" / "bucketserve" / "triton" / "metrics.py").read_text()
    for flag in ("total-queued-requests-metric", "total-running-requests-metric", "kv-cache-usage-percentage-metric"):
        name = flags[flag].split("{")[0]
        assert f'"{name}"' in exported, flag
