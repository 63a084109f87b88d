"""The Argo CD health check (charts/llmops-operator/argocd/health.lua) run by a Python Lua 5.1 runtime (lupa), for
quick checks of the script's logic and messages. The contract (docs/gitops.md's table) is checked with Argo CD's
own interpreter, gopher-lua, in test_gitops_contract.py; lupa opens every Lua library, Argo CD does not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from lupa import lua51  # a real Lua runtime, from the `test` extra

from llmops.status import Verdict, conditions_for

ARGOCD = Path(__file__).resolve().parents[2] / "charts" / "llmops-operator" / "argocd"
HEALTH_LUA = (ARGOCD / "health.lua").read_text()
KINDS = ("FineTune", "BatchInference", "LLMService")
NOW = "2026-11-25T12:00:00Z"


def health(obj: dict[str, Any], script: str = HEALTH_LUA) -> dict[str, str]:
    """Run the script as Argo CD does: `obj` bound to the live object, the returned table is the health."""
    lua = lua51.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute(script)
    return {"status": result["status"], "message": result["message"]}


def resource(kind: str, verdict: Verdict | None, generation: int = 1, observed: int | None = None) -> dict[str, Any]:
    """A resource whose status is what the operator writes for `verdict` (None: not reconciled yet)."""
    obj: dict[str, Any] = {"apiVersion": "llmops.dev/v1alpha1", "kind": kind,
                           "metadata": {"name": "x", "namespace": "ns", "generation": generation}, "spec": {}}
    if verdict is not None:
        seen = generation if observed is None else observed
        obj["status"] = {"phase": verdict.phase, "observedGeneration": seen, "message": verdict.message,
                         "conditions": conditions_for(verdict, seen, None, NOW)}
    return obj


CASES = [
    # (kind, verdict, Argo CD health, words in the message)
    ("FineTune", Verdict("Pending", "progressing", "Creating", "creating the RayJob"),
     "Progressing", "Pending (Creating): creating the RayJob"),
    ("FineTune", Verdict("Pending", "progressing", "RayClusterStarting", "waiting for the Ray cluster's pods"),
     "Progressing", "RayClusterStarting"),
    ("FineTune", Verdict("Running", "progressing", "JobRunning", "the Ray job is running (step 40)"),
     "Progressing", "Running (JobRunning): the Ray job is running (step 40)"),
    ("FineTune", Verdict("Running", "progressing", "Retrying", "the Ray job failed and is being retried"),
     "Progressing", "Retrying"),
    ("FineTune", Verdict("Succeeded", "ready", "Succeeded", "adapter written"),
     "Healthy", "Succeeded (Succeeded): adapter written"),
    ("FineTune", Verdict("Failed", "stalled", "PayloadFailed", "loss is NaN at step 40"),
     "Degraded", "Failed (PayloadFailed): loss is NaN at step 40"),
    ("FineTune", Verdict("Failed", "stalled", "InvalidSpec", "spec.extraArgs may not set output_dir"),
     "Degraded", "Failed (InvalidSpec): spec.extraArgs may not set output_dir"),
    ("FineTune", Verdict("Pending", "progressing", "Unschedulable", "Insufficient nvidia.com/gpu. Waiting"),
     "Progressing", "Pending (Unschedulable): Insufficient nvidia.com/gpu. Waiting"),
    ("FineTune", Verdict("Pending", "stalled", "Unschedulable", "Insufficient nvidia.com/gpu"),
     "Degraded", "Pending (Unschedulable): Insufficient nvidia.com/gpu"),
    ("FineTune", Verdict("Failed", "stalled", "RayJobDeleted", "RayJob ft-ft was deleted"),
     "Degraded", "Failed (RayJobDeleted): RayJob ft-ft was deleted"),
    ("FineTune", Verdict("Suspended", "suspended", "Suspended", "spec.suspend is true"),
     "Suspended", "Suspended (Suspended): spec.suspend is true"),
    ("BatchInference", Verdict("Waiting", "progressing", "WaitingForFineTune", "waiting for FineTune viggo"),
     "Progressing", "Waiting (WaitingForFineTune)"),
    ("BatchInference", Verdict("Waiting", "progressing", "FineTuneNotFound", "FineTune viggo does not exist"),
     "Progressing", "Waiting (FineTuneNotFound)"),
    ("BatchInference", Verdict("Waiting", "stalled", "FineTuneNotFound", "FineTune viggo does not exist"),
     "Degraded", "Waiting (FineTuneNotFound)"),
    ("BatchInference", Verdict("Succeeded", "ready", "Succeeded", "exactMatch 0.688"), "Healthy", "0.688"),
    ("BatchInference", Verdict("Suspended", "suspended", "Suspended", "spec.suspend is true"), "Suspended", "suspend"),
    ("LLMService", Verdict("Pending", "progressing", "Initializing", "waiting for the Ray cluster"),
     "Progressing", "Initializing"),
    ("LLMService", Verdict("Ready", "ready", "Serving", "serving"), "Healthy", "Ready (Serving): serving"),
    ("LLMService", Verdict("Ready", "ready", "ServingWithAdaptersPending", "serving; 1 adapter waiting"),
     "Healthy", "ServingWithAdaptersPending"),
    ("LLMService", Verdict("Upgrading", "progressing", "UpgradeInProgress", "a new Ray cluster is starting"),
     "Progressing", "UpgradeInProgress"),
    ("LLMService", Verdict("Upgrading", "stalled", "UpgradeCannotFit", "needs twice the GPUs"),
     "Degraded", "UpgradeCannotFit"),
    ("LLMService", Verdict("Failed", "stalled", "ServeApplicationFailed", "DEPLOY_FAILED"), "Degraded", "DEPLOY_FAILED"),
    ("LLMService", Verdict("Suspended", "suspended", "Suspended", "the RayService is removed"), "Suspended", "removed"),
]


@pytest.mark.parametrize("kind, verdict, expected, words", CASES,
                         ids=[f"{c[0]}-{c[1].phase}-{c[1].reason}" for c in CASES])
def test_every_phase_maps_to_argo_health(kind, verdict, expected, words):
    got = health(resource(kind, verdict))
    assert got["status"] == expected, got
    assert words in got["message"], got


def test_not_yet_reconciled_or_stale_status_is_progressing():
    assert health(resource("FineTune", None)) == {
        "status": "Progressing", "message": "Waiting for the llmops operator to report status"}
    # A Succeeded status for generation 1 says nothing about the spec of generation 2.
    done = Verdict("Succeeded", "ready", "Succeeded", "adapter written")
    assert health(resource("FineTune", done, generation=2, observed=1)) == {
        "status": "Progressing", "message": "Waiting for the llmops operator to observe generation 2"}
    # Conditions lagging behind the top-level observedGeneration are not trusted either.
    stale = resource("LLMService", Verdict("Failed", "stalled", "ServeApplicationFailed", "old failure"), generation=3)
    for condition in stale["status"]["conditions"]:
        condition["observedGeneration"] = 2
    assert health(stale)["status"] == "Progressing"
    # A status without conditions (e.g. written by hand) is not Healthy.
    assert health({"metadata": {"generation": 1}, "status": {"observedGeneration": 1}})["status"] == "Progressing"
    # What the API server shows before the operator's first write (the CRDs default observedGeneration to 0).
    assert health({"metadata": {"generation": 1}, "status": {"observedGeneration": 0}})["status"] == "Progressing"


def test_the_argo_cd_values_install_this_script_for_every_kind():
    values = yaml.safe_load((ARGOCD / "argo-cd-values.yaml").read_text())
    cm = values["configs"]["cm"]
    assert set(cm) == {f"resource.customizations.health.llmops.dev_{kind}" for kind in KINDS}
    failed = resource("FineTune", Verdict("Failed", "stalled", "PayloadFailed", "boom"))
    for script in cm.values():
        assert script == HEALTH_LUA
        assert health(failed, script)["status"] == "Degraded"
