"""Every Kustomize combination renders and validates strictly; the rules pass promtool."""

from __future__ import annotations

import itertools
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from deploytools import require_tool
from helpers import ROOT

K8S = ROOT / "deploy" / "k8s"
COMPONENTS = sorted(p.name for p in (K8S / "components").iterdir() if p.is_dir())
KUBERNETES_VERSION = "1.32.0"
# Custom resources: no schema ships for them, so they get the structural checks below only.
CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("networking.istio.io/v1", "VirtualService"),
    ("networking.istio.io/v1", "DestinationRule"),
}
COMBINATIONS = [c for n in range(len(COMPONENTS) + 1) for c in itertools.combinations(COMPONENTS, n)]


def render(components: tuple[str, ...], tmp_path: Path) -> list[dict]:
    kubectl = require_tool("kubectl")
    overlay = tmp_path / "overlay"
    overlay.mkdir(exist_ok=True)
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "base", overlay)],  # kustomize refuses absolute paths
        "components": [os.path.relpath(K8S / "components" / c, overlay) for c in components],
    }))
    out = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_the_components_are_the_documented_ones():
    assert COMPONENTS == ["autoscaling", "availability", "gpu", "istio", "monitoring", "redis"]


@pytest.mark.parametrize("components", COMBINATIONS, ids=lambda c: "+".join(c) or "base")
def test_every_combination_renders_and_validates_strictly(components, tmp_path):
    import kubernetes_validate

    docs = render(components, tmp_path)
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            assert doc["metadata"]["name"] and doc["spec"]
            continue
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), names


def _pods(docs):
    return {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs if d["kind"] == "Deployment"}


def test_every_container_is_hardened_and_probed(tmp_path):
    for name, pod in _pods(render(tuple(COMPONENTS), tmp_path)).items():
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["automountServiceAccountToken"] is False, name
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert container["readinessProbe"] and container["livenessProbe"], name
            assert container["resources"]["requests"] and container["resources"]["limits"]["memory"], name


def test_gpu_split_keeps_the_model_service_private(tmp_path):
    docs = render(("gpu",), tmp_path)
    pods = _pods(docs)
    gateway, model = pods["bentoformers"]["containers"][0], pods["bentoformers-model"]["containers"][0]
    assert "nvidia.com/gpu" not in gateway["resources"].get("limits", {})
    assert model["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "--depends=model-minilm=http://bentoformers-model:3000" in gateway["args"]
    assert "--service-name=model-minilm" in model["args"]
    assert model["image"] == "localhost/bentoformers-gpu:latest" and gateway["image"] == "localhost/bentoformers:latest"
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    selected = policy["spec"]["podSelector"]["matchLabels"]
    template = next(d for d in docs if d["metadata"]["name"] == "bentoformers-model" and d["kind"] == "Deployment")
    assert selected.items() <= template["spec"]["template"]["metadata"]["labels"].items()
    sources = [peer for rule in policy["spec"]["ingress"] for peer in rule["from"]]
    gateway_labels = next(d for d in docs if d["metadata"]["name"] == "bentoformers" and d["kind"] == "Deployment")[
        "spec"]["template"]["metadata"]["labels"]
    # Only the gateway from this namespace; the other rule is Prometheus from its own namespace.
    same_namespace = [p for p in sources if "namespaceSelector" not in p]
    assert len(same_namespace) == 1 and same_namespace[0]["podSelector"]["matchLabels"].items() <= gateway_labels.items()
    assert all(p["podSelector"]["matchLabels"].get("app.kubernetes.io/component") != "model" for p in sources)
    # Prometheus reaches the metrics port only; the API port is the gateway's.
    ports = {rule["from"][0].get("namespaceSelector") is None: [p["port"] for p in rule["ports"]]
             for rule in policy["spec"]["ingress"]}
    assert ports == {True: [3000], False: [3001]}
    # The second wall: both read the same internal token from one Secret (middleware/internal.py).
    for container in (gateway, model):
        (token,) = [e for e in container["env"] if e["name"] == "BENTOFORMERS_INTERNAL_TOKEN"]
        assert token["valueFrom"]["secretKeyRef"] == {"name": "bentoformers-internal", "key": "BENTOFORMERS_INTERNAL_TOKEN"}
    assert {"name": "BENTOFORMERS_METRICS_PORT", "value": "3001"} in model["env"]


def test_the_podman_overlay_validates_and_leaves_out_only_the_secret():
    import kubernetes_validate

    kubectl = require_tool("kubectl")
    out = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / "podman")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "Deployment", "Service"]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    assert {"configMapRef": {"name": "bentoformers-keys"}} in deployment["spec"]["template"]["spec"]["containers"][0]["envFrom"]


def test_prometheus_rule_resource_matches_the_rules_file():
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yaml").read_text())
    resource = yaml.safe_load((K8S / "components" / "monitoring" / "prometheusrule.yaml").read_text())
    assert resource["spec"] == rules


def test_alert_rules_check_and_unit_tests_pass():
    promtool = require_tool("promtool")
    folder = ROOT / "deploy" / "prometheus"
    for args in (["check", "rules", "alerts.yaml"], ["test", "rules", "alerts.test.yaml"]):
        out = subprocess.run([promtool, *args], cwd=folder, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr


def test_every_setting_the_manifests_name_is_one_the_service_reads(tmp_path):
    """pydantic-settings ignores unknown BENTOFORMERS_* variables, so a renamed setting would go unnoticed."""
    import re

    from bentoformers.settings import Settings

    docs = render(tuple(COMPONENTS), tmp_path)
    named = set(re.findall(r"\bBENTOFORMERS_([A-Z0-9_]+)", yaml.safe_dump_all(docs)))
    assert named, "the manifests set no BENTOFORMERS_* variable"
    unknown = sorted(n for n in named if n.lower() not in Settings.model_fields)
    assert not unknown, unknown


def test_the_service_monitor_scrapes_metrics_ports_only(tmp_path):
    """With the model service in pods of its own, every port the ServiceMonitor picks on each Service it selects
    is a metrics page: never the model's API port, which refuses any caller without the internal token (its
    target would always be down, and BentoformersTargetDown would fire)."""
    docs = render(("gpu", "monitoring"), tmp_path)
    (monitor,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    wanted = {e["port"] for e in monitor["spec"]["endpoints"]}
    selected = [d for d in docs if d["kind"] == "Service" and monitor["spec"]["selector"]["matchLabels"].items()
                <= d["metadata"].get("labels", {}).items()]
    scraped = {d["metadata"]["name"]: sorted(p["targetPort"] for p in d["spec"]["ports"] if p["name"] in wanted)
               for d in selected}
    assert scraped == {"bentoformers": [3000], "bentoformers-model": [3001]}, scraped
