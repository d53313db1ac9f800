"""The Kubernetes manifests in deploy/k8s: valid against a current Kubernetes schema (the
`kubernetes-validate` package, strict: unknown fields are errors), and consistent with each
other, with the image and with the service's settings and routes."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service.api.app import create_app
from service.config import Settings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
VERSION = kubernetes_validate.latest_version()


def _documents() -> list[dict[str, Any]]:
    return [d for f in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]


DOCS = _documents()


def _one(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in DOCS if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


API = _one("Deployment", "visrec-api")
POD = API["spec"]["template"]["spec"]
(CONTAINER,) = POD["containers"]


@pytest.mark.parametrize("doc", DOCS, ids=[f"{d['kind']}/{d['metadata']['name']}" for d in DOCS])
def test_every_manifest_is_valid_kubernetes(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, VERSION, strict=True)


def test_the_validation_catches_a_misspelt_field() -> None:
    broken = copy.deepcopy(API)
    broken["spec"]["replica"] = broken["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError, match="replica"):
        kubernetes_validate.validate(broken, VERSION, strict=True)


def test_every_kind_the_deployment_needs_is_there() -> None:
    kinds = {d["kind"] for d in DOCS}
    assert {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Secret",
        "ConfigMap",
        "PersistentVolumeClaim",
    } <= kinds


def test_probes_ask_routes_the_app_has() -> None:
    settings = Settings(checkpoint=Path("unused.pt"), features=Path("unused"))
    paths = set(create_app(settings).openapi()["paths"])  # routers' routes included
    assert CONTAINER["livenessProbe"]["httpGet"]["path"] == "/healthz" in paths
    assert CONTAINER["readinessProbe"]["httpGet"]["path"] == "/readyz" in paths
    ports = {p["name"] for p in CONTAINER["ports"]}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert CONTAINER[probe]["httpGet"]["port"] in ports


def test_the_settings_are_the_services_own_and_valid() -> None:
    config = _one("ConfigMap", "visrec-settings")["data"]
    known = {f"VISREC_{name.upper()}" for name in Settings.model_fields}
    assert set(config) <= known, set(config) - known
    secret = _one("Secret", "visrec-keys")["stringData"]
    assert set(secret) == {"VISREC_API_KEYS", "VISREC_ADMIN_KEYS"}
    assert all(v == "" for v in secret.values())  # no key is ever committed
    values = {k.removeprefix("VISREC_").lower(): v for k, v in config.items()}
    Settings.model_validate(
        {**values, "environment": "development", "checkpoint": "x.pt", "features": "f"}
    )


def test_threads_match_the_cpu_limit() -> None:
    config = _one("ConfigMap", "visrec-settings")["data"]
    limit = CONTAINER["resources"]["limits"]["cpu"]
    assert int(config["VISREC_CPU_THREADS"]) == int(limit)
    env = {e["name"]: e["value"] for e in CONTAINER["env"]}
    assert env["OMP_NUM_THREADS"] == config["VISREC_CPU_THREADS"]


def test_selectors_and_references_point_at_what_exists() -> None:
    labels = API["spec"]["template"]["metadata"]["labels"]
    assert API["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = _one("Service", "visrec-api")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] in {p["name"] for p in CONTAINER["ports"]}
    pdb = _one("PodDisruptionBudget", "visrec-api")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = _one("HorizontalPodAutoscaler", "visrec-api")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "visrec-api",
    }
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]  # a node can drain
    for source in CONTAINER["envFrom"]:
        kind, ref = (
            ("ConfigMap", source["configMapRef"])
            if "configMapRef" in source
            else (
                "Secret",
                source["secretRef"],
            )
        )
        _one(kind, ref["name"])
    redis = _one("Service", "visrec-redis")
    config = _one("ConfigMap", "visrec-settings")["data"]
    port = redis["spec"]["ports"][0]["port"]
    assert config["VISREC_REDIS_URL"].startswith(f"redis://visrec-redis:{port}/")
    for volume in POD["volumes"]:
        if "persistentVolumeClaim" in volume:
            _one("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])


def test_pods_run_as_the_images_non_root_user_on_a_read_only_root() -> None:
    dockerfile = (ROOT / "docker" / "Dockerfile.cpu").read_text()
    uid = int(re.search(r"--uid (\d+)", dockerfile).group(1))  # type: ignore[union-attr]
    assert POD["securityContext"]["runAsNonRoot"] is True
    assert POD["securityContext"]["runAsUser"] == uid != 0
    context = CONTAINER["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m for m in CONTAINER["volumeMounts"]}
    registry = _one("ConfigMap", "visrec-settings")["data"]["VISREC_REGISTRY"]
    assert mounts[registry]["readOnly"] is True  # the model registry's volume
    assert [m for m in mounts.values() if not m.get("readOnly")] == [mounts["/tmp"]]


def test_the_stream_consumers_run_beside_the_api_on_its_settings_and_registry() -> None:
    ingest = _one("Deployment", "visrec-ingest")
    pod = ingest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["visrec-ingest"]
    assert container["envFrom"] == [{"configMapRef": {"name": "visrec-settings"}}]
    assert pod["securityContext"] == POD["securityContext"]
    assert container["securityContext"] == CONTAINER["securityContext"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    config = _one("ConfigMap", "visrec-settings")["data"]
    assert mounts[config["VISREC_REGISTRY"]]["readOnly"] is True  # which items exist
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
              if "persistentVolumeClaim" in v}  # fmt: skip
    assert claims[mounts[config["VISREC_REGISTRY"]]["name"]] == "visrec-models"
