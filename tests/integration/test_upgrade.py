"""Upgrading the operator while resources run: the previous release's operator (and CRDs) takes resources to
mid-flight, then the current one replaces it. Nothing is created twice, no result is lost, everything converges."""

from __future__ import annotations

import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from llmops.dev.install import install_crds
from llmops.dev.simulator import Simulator

from integration.harness import OperatorProcess, condition, phase, wait_for
from manifests import batchinference, finetune, llmservice

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# The release users run before this one: the last commit whose CI passed before checkpoint resume, preemption and
# the typed status writes landed. Bump it when a release is cut.
PREVIOUS_RELEASE = "ebed3f5"


@pytest.fixture()
def previous_release(tmp_path) -> Path:
    """The previous release's operator package and CRDs, out of git."""
    archive = tmp_path / "previous.tar"
    done = subprocess.run(["git", "-C", str(REPO), "archive", "-o", str(archive), PREVIOUS_RELEASE, "operator", "crds"],
                          capture_output=True, text=True)
    assert done.returncode == 0, (f"the upgrade test needs the git history holding {PREVIOUS_RELEASE} (a full clone "
                                  f"of the repository): {done.stderr}")
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "previous", filter="data")
    return tmp_path / "previous"


def _children(cluster, ns) -> dict[tuple[str, str], str]:
    """Every object the operators made in the namespace: (kind, name) -> uid."""
    found = {("RayJob", o["metadata"]["name"]): o["metadata"]["uid"] for o in cluster.ray_list("rayjobs", ns)}
    found.update({("RayService", o["metadata"]["name"]): o["metadata"]["uid"]
                  for o in cluster.ray_list("rayservices", ns)})
    for cm in cluster.core.list_namespaced_config_map(ns).items:
        if (cm.metadata.labels or {}).get("app.kubernetes.io/managed-by") == "llmops":
            found[("ConfigMap", cm.metadata.name)] = cm.metadata.uid
    return found


def _converged(obj) -> bool:
    status = (obj or {}).get("status") or {}
    return status.get("observedGeneration") == obj["metadata"]["generation"] and any(
        c.get("status") == "True" for c in status.get("conditions") or [] if c["type"] in ("Ready", "Reconciling"))


def test_upgrade_mid_flight_loses_nothing_and_duplicates_nothing(plane, cluster, ns, tmp_path, alone,
                                                                  previous_release):
    simulator = Simulator(plane.kubeconfig, run_seconds=0, namespace=ns)
    plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(previous_release / "crds"), quiet=True)
    old = OperatorProcess(plane, tmp_path / "previous.log", args=("-n", ns),
                          env_extra={"PYTHONPATH": str(previous_release / "operator")}).start()
    resources = [("FineTune", "done"), ("FineTune", "running"), ("BatchInference", "waiting"),
                 ("LLMService", "svc")]
    try:
        assert "previous/operator/llmops" in _module_path(previous_release)
        cluster.create(finetune("done"), ns)
        cluster.create(llmservice("svc", adapters=[{"name": "done", "fineTuneRef": {"name": "done"}}]), ns)
        wait_for(lambda: (simulator.step() or True) and phase(cluster.get("FineTune", ns, "done")) == "Succeeded",
                 timeout=120, what="FineTune done to succeed under the previous release")
        cluster.create(finetune("running"), ns)   # after the simulator's passes: it stays Running
        cluster.create(batchinference("waiting", fine_tune="running"), ns)
        wait_for(lambda: phase(cluster.get("FineTune", ns, "running")) == "Running", timeout=90,
                 what="FineTune running to run")
        wait_for(lambda: condition(cluster.get("BatchInference", ns, "waiting"), "Reconciling").get("reason")
                 == "WaitingForFineTune", timeout=60, what="the BatchInference to wait")
        wait_for(lambda: cluster.ray("rayservices", ns, "svc-llm") is not None, timeout=60, what="the RayService")
        wait_for(lambda: all(_converged(cluster.get(k, ns, n)) for k, n in resources), timeout=60,
                 what="every resource observed by the previous release")
        before_children = _children(cluster, ns)
        before = {(k, n): cluster.get(k, ns, n)["status"] for k, n in resources}
    finally:
        old.stop()

    install_crds(plane)   # the upgrade: this release's CRDs, then its operator
    new = OperatorProcess(plane, tmp_path / "current.log", args=("-n", ns)).start()
    try:
        wait_for(lambda: all(_converged(cluster.get(k, ns, n)) for k, n in resources), timeout=60,
                 what="every resource observed by the current release")
        time.sleep(3)   # what a restart reconciles, it reconciles in its first seconds: let duplicates show
        after_children = _children(cluster, ns)
        assert {k: v for k, v in after_children.items() if k in before_children} == before_children, \
            "a child was re-created (new uid) by the upgrade"
        assert len(cluster.ray_list("rayjobs", ns)) == 2 and len(cluster.ray_list("rayservices", ns)) == 1
        done = cluster.get("FineTune", ns, "done")["status"]
        assert done["phase"] == "Succeeded"
        for field in ("adapter", "metrics", "completionTime", "startTime"):
            assert done.get(field) == before[("FineTune", "done")].get(field), field
        assert phase(cluster.get("FineTune", ns, "running")) == "Running"

        # The run started under the previous release finishes under this one, and what waited on it proceeds.
        wait_for(lambda: (simulator.step() or True) and phase(cluster.get("FineTune", ns, "running")) == "Succeeded",
                 timeout=120, what="FineTune running to succeed after the upgrade")
        wait_for(lambda: phase(cluster.get("BatchInference", ns, "waiting")) in ("Running", "Succeeded"),
                 timeout=90, what="the BatchInference to start on the adapter")
        assert len(cluster.ray_list("rayjobs", ns)) == 3
    finally:
        new.stop()


def _module_path(previous_release: Path) -> str:
    """Where `python -m llmops.cli` with the previous release's PYTHONPATH imports llmops from."""
    import os
    import sys

    done = subprocess.run([sys.executable, "-c", "import llmops; print(llmops.__file__)"], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(previous_release / "operator")})
    return done.stdout.strip()
