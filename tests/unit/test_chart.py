"""The Helm chart, its schema, the artifacts generated from it, and the Dockerfiles (which cannot be built here).

Golden files: tests/golden/helm/*.yaml are `helm template` of the chart's templates (CRDs excluded: they are
generated from the API models and checked by `llmops crds --check`). After a deliberate change, regenerate them with
    python -m pytest tests/unit/test_chart.py --update-golden
and review the YAML diff.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmops.dev.plane import BUILD_HINT, bin_dir
from llmops.settings import (CLOUDS, FINETUNE_PIP_FALLBACK, IMAGE_RAY_VERSION, NODE_SELECTORS, STOCK_RAY_IMAGE,
                             Settings)

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "llmops-operator"
GOLDEN = REPO / "tests" / "golden" / "helm"

VARIANTS = {
    "default": [],
    # namespace mode, with every optional template on
    "namespaced": ["--set", "watchNamespaces={team-a,team-b}", "--set", "leaderElection.enabled=true",
                   "--set", "metrics.serviceMonitor.enabled=true"],
    # the one value that differs per cluster (docs/clusters.md); default is gpu-operator
    "gke": ["--set", "cloud=gke"],
    "eks": ["--set", "cloud=eks"],
}


@pytest.fixture(scope="module")
def helm() -> str:
    path = bin_dir() / "helm"
    if not path.exists():
        pytest.fail(f"{path} is missing: build the local toolchain with `{BUILD_HINT}`")
    return str(path)


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm, *args], capture_output=True, text=True)


def template(helm: str, *values: str) -> str:
    result = run_helm(helm, "template", "llmops", str(CHART), "--namespace", "llmops-system", *values)
    assert result.returncode == 0, result.stderr
    return result.stdout


def objects(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def test_helm_lint(helm):
    for name, values in VARIANTS.items():
        result = run_helm(helm, "lint", "--strict", str(CHART), *values)
        assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rendered_chart_matches_golden(helm, variant, request):
    rendered = template(helm, *VARIANTS[variant])
    golden = GOLDEN / f"{variant}.yaml"
    if request.config.getoption("--update-golden"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(rendered)
    assert golden.exists(), f"{golden} is missing: run with --update-golden"
    assert rendered == golden.read_text(), f"{golden.name} is stale: rerun with --update-golden and review the diff"


@pytest.mark.parametrize("values, message", [
    (["--set", "replicas=-1"], "at '/replicas': minimum: got -1, want 0"),
    (["--set", "replicas=2"], "at '/replicas': maximum: got 2, want 1"),
    (["--set", "watchNamespaces={Team_A}"], "at '/watchNamespaces/0'"),
    (["--set", "replica=1"], "additional properties 'replica' not allowed"),
    (["--set", "settings.finetune_imag=x"], "at '/settings': additional properties 'finetune_imag' not allowed"),
    (["--set", "logLevel=loud"], "at '/logLevel'"),
], ids=["negative-replicas", "two-replicas-without-leader-election", "bad-namespace", "typo", "settings-typo", "log-level"])
def test_schema_rejects_bad_values(helm, values, message):
    result = run_helm(helm, "template", "x", str(CHART), *values)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr, result.stderr


def test_rbac_is_least_privilege(helm):
    """Rights come only from the listed rules: no Secrets, no wildcards, nothing cluster-wide in namespace mode."""
    cluster = objects(template(helm, "--set", "leaderElection.enabled=true"))
    namespaced = objects(template(helm, *VARIANTS["namespaced"]))
    roles = [o for o in cluster + namespaced if o["kind"] in ("ClusterRole", "Role")]
    for role in roles:
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], rule
            assert "secrets" not in rule["resources"], rule
            assert not {"escalate", "bind", "impersonate", "deletecollection"} & set(rule["verbs"]), rule
    assert {o["kind"] for o in namespaced if o["kind"].startswith("Cluster")} == set()
    assert sorted((o["kind"], o["metadata"]["namespace"]) for o in namespaced
                  if o["kind"] in ("Role", "RoleBinding")) == [
        ("Role", "llmops-system"), ("Role", "team-a"), ("Role", "team-b"),
        ("RoleBinding", "llmops-system"), ("RoleBinding", "team-a"), ("RoleBinding", "team-b")]
    deployment = next(o for o in namespaced if o["kind"] == "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[0] == "run" and "--namespace=team-a" in args and "--namespace=team-b" in args
    assert "--leader-election=llmops" in args


LEASE_RULES = [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
               {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": ["llmops"],
                "verbs": ["get", "list", "watch", "update"]}]


@pytest.mark.parametrize("variant", [["--set", "leaderElection.enabled=true"], VARIANTS["namespaced"]],
                         ids=["cluster-wide", "namespaced"])
def test_leader_election_gets_its_lease_and_nothing_more(helm, variant):
    """One Role in the release namespace, in either mode: get/list/watch/update on the one Lease (by name), create;
    no other Lease."""
    rendered = objects(template(helm, *variant))
    lease_roles = [o for o in rendered if o["kind"] in ("ClusterRole", "Role")
                   and any("leases" in rule["resources"] for rule in o["rules"])]
    assert [(o["kind"], o["metadata"]["namespace"], o["metadata"]["name"]) for o in lease_roles] == [
        ("Role", "llmops-system", "llmops-operator-leader-election")]
    assert lease_roles[0]["rules"] == LEASE_RULES
    binding = next(o for o in rendered if o["kind"] == "RoleBinding"
                   and o["metadata"]["name"] == "llmops-operator-leader-election")
    assert binding["metadata"]["namespace"] == "llmops-system"
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "llmops-operator-leader-election"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "llmops-operator", "namespace": "llmops-system"}]


def test_leader_election_lets_replicas_stand_by(helm):
    """With leader election any number of replicas (one leads, the others wait); without it the schema allows one."""
    rendered = objects(template(helm, "--set", "leaderElection.enabled=true", "--set", "replicas=3"))
    deployment = next(o for o in rendered if o["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 3
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert [a for a in container["args"] if a.startswith("--leader-election")] == ["--leader-election=llmops"]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    # Without leader election: no Lease rights at all.
    default = objects(template(helm))
    assert not [rule for o in default if o["kind"] in ("ClusterRole", "Role") for rule in o["rules"]
                if "leases" in rule["resources"]]


def test_deployment_is_locked_down(helm):
    deployment = next(o for o in objects(template(helm)) if o["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}
    assert set(container["resources"]) == {"requests", "limits"}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "probe"}
    assert {"name": "probe", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
    assert container["args"] == ["run", "--probe-port=8080", "--metrics-port=9090", "--log-format=json"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["LLMOPS_SETTINGS_FILE"] == "/etc/llmops/settings.yaml"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/etc/llmops"] == "settings"


def test_chart_settings_are_the_operator_defaults(helm, tmp_path):
    """The ConfigMap the chart renders is a settings file the operator loads, equal to its built-in defaults."""
    config = next(o for o in objects(template(helm)) if o["kind"] == "ConfigMap")
    path = tmp_path / "settings.yaml"
    path.write_text(config["data"]["settings.yaml"])
    assert Settings.load(path, environ={}) == Settings()
    # values.schema.json knows every settings field (namespaces comes from watchNamespaces).
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert set(schema["properties"]["settings"]["properties"]) == set(Settings.model_fields) - {"namespaces", "cloud"}
    assert schema["properties"]["cloud"]["enum"] == list(CLOUDS)


@pytest.mark.parametrize("cloud", CLOUDS)
def test_one_value_picks_the_clouds_gpu_nodes(helm, tmp_path, cloud):
    """`--set cloud=X` gives the operator settings whose profiles select X's GPU node labels."""
    config = next(o for o in objects(template(helm, "--set", f"cloud={cloud}")) if o["kind"] == "ConfigMap")
    path = tmp_path / "settings.yaml"
    path.write_text(config["data"]["settings.yaml"])
    settings = Settings.load(path, environ={})
    assert settings == Settings(cloud=cloud)
    assert settings.profiles()["L4"].node_selector == NODE_SELECTORS[cloud]["L4"]


def test_schema_rejects_an_unknown_cloud(helm):
    result = run_helm(helm, "template", "x", str(CHART), "--set", "cloud=aks")
    assert result.returncode != 0 and "at '/cloud'" in result.stderr, result.stderr


def test_generated_install_files_are_current():
    result = subprocess.run([sys.executable, str(REPO / "tools" / "sync_kustomize.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ---- images (no container engine here: the Dockerfiles are checked as text) ---------------------------------
def instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_operator_image():
    steps = instructions(REPO / "docker" / "operator.Dockerfile")
    bases = [rest.split()[0] for word, rest in steps if word == "FROM"]
    for base in bases:
        assert re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+", base), f"unpinned or non-slim base {base}"
    assert len(set(bases)) == 1
    user = [rest for word, rest in steps if word == "USER"]
    assert user and re.fullmatch(r"[1-9]\d*:[1-9]\d*", user[-1]), "the final USER must be a numeric non-root uid:gid"
    assert steps.index(("USER", user[-1])) > max(i for i, (w, _) in enumerate(steps) if w == "RUN")
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    entrypoint = json.loads(next(rest for word, rest in steps if word == "ENTRYPOINT"))
    assert entrypoint == ["llmops"] and scripts["llmops"] == "llmops.cli:main"
    assert json.loads(next(rest for word, rest in steps if word == "CMD")) == ["run"]
    assert any(word == "RUN" and "pip wheel" in rest and rest.rstrip().endswith(" .") for word, rest in steps)
    # The uid matches the chart's default securityContext.
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert user[-1] == f"{values['podSecurityContext']['runAsUser']}:{values['podSecurityContext']['runAsGroup']}"


def test_ray_runtime_image_pins_match_the_project():
    steps = instructions(REPO / "docker" / "ray-runtime.Dockerfile")
    base = next(rest for word, rest in steps if word == "FROM")
    assert base == STOCK_RAY_IMAGE, "the training image builds on the stock Ray image the fallback uses"
    quoted = re.findall(r'"([^"]+)"', " ".join(rest for word, rest in steps if word == "RUN"))
    requirements = [q for q in quoted if not q.startswith("import ")]
    assert all(re.fullmatch(r"[\w\[\],.-]+==[\w.]+", r) for r in requirements), requirements
    training = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["training"]
    # Everything the project pins for training, and everything the runtime env would add, at the same versions.
    assert set(training) | set(FINETUNE_PIP_FALLBACK) <= set(requirements)
    assert f"ray[train]=={IMAGE_RAY_VERSION}" in requirements   # the Ray of the base image, not another
    assert any(r.startswith("flash-attn==") for r in requirements)
