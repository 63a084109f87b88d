"""Each kind's decide, pure: hand-built observations in, an Outcome out. No engine, no caches, no client."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmops.api.batchinference import BatchInferenceSpec, BatchInferenceStatus
from llmops.api.finetune import FineTuneSpec, FineTuneStatus
from llmops.api.llmservice import LLMServiceSpec, LLMServiceStatus
from llmops.builders.common import BuildContext, Owner, built_from, load_payloads
from llmops.builders.exposure import HTTP_ROUTE
from llmops.decide import batchinference, finetune, llmservice
from llmops.decide.batchinference import BatchInferenceObservation, FineTuneSeen
from llmops.decide.jobs import PODS_LATE_SECONDS, QUEUE_RECHECK_SECONDS, WORKLOAD_WAIT_SECONDS, JobObservation
from llmops.decide.llmservice import ServiceObservation
from llmops.settings import Settings
from llmops.status import DEPENDENCY_RECHECK_SECONDS, PODS_REFUSED, PodProblem, rfc3339

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "viggo"
CTX = BuildContext(settings=Settings(), payloads=load_payloads())
NOW = 1_800_000_000.0
READY = {"type": "Ready", "status": "True", "reason": "Succeeded", "message": "done"}


def example(name: str) -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())


def owner(kind: str, name: str, generation: int = 1) -> Owner:
    return Owner("llmops.dev/v1alpha1", kind, name, "default", f"uid-{name}", generation)


def ray_job(deployment: str = "Running", job: str = "RUNNING", **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "viggo-ft", "uid": "ray-uid"},
            "status": {"jobDeploymentStatus": deployment, "jobStatus": job, "rayClusterName": "viggo-ft-abc",
                       **status}}


def finetune_obs(**fields: Any) -> JobObservation:
    spec = FineTuneSpec.model_validate(fields.pop("spec", example("finetune")["spec"]))
    return JobObservation(owner("FineTune", "viggo"), FineTuneStatus.read(fields.pop("status", {})), spec, now=NOW,
                          **fields)


def memo(obs: JobObservation, extra: dict[str, Any] | None = None, ctx: BuildContext = CTX) -> str:
    """The memo key decide gives the children of `obs` (what the engine remembers as applied)."""
    return built_from(ctx, obs.owner, sorted((extra or {}).items()))


# ---- FineTune -------------------------------------------------------------------------------------------------
def test_an_invalid_spec_is_stalled_naming_the_field_and_builds_nothing():
    out = finetune.decide(JobObservation(owner("FineTune", "viggo"), FineTuneStatus(), None,
                                         "spec.training.epochs: must be > 0"), CTX)
    assert (out.verdict.phase, out.verdict.state, out.verdict.reason) == ("Failed", "stalled", "InvalidSpec")
    assert out.verdict.message == "spec.training.epochs: must be > 0" and out.children == []


def test_a_new_finetune_builds_its_children_and_starts_creating():
    out = finetune.decide(finetune_obs(), CTX)
    assert "RayJob" in [c["kind"] for c in out.children]
    assert (out.verdict.phase, out.verdict.reason) == ("Pending", "Creating")
    assert out.verdict.fields.start_time is None and out.memo_key == memo(finetune_obs())


def test_children_applied_as_built_are_not_built_again():
    obs = finetune_obs(ray=ray_job(), status={"startTime": "2027-01-01T00:00:00Z"})
    applied = finetune_obs(ray=ray_job(), status={"startTime": "2027-01-01T00:00:00Z"}, applied_for=memo(obs))
    assert finetune.decide(obs, CTX).children, "children never applied must be built"
    out = finetune.decide(applied, CTX)
    assert out.children == [] and out.verdict.reason == "JobRunning"
    assert out.verdict.fields.start_time == "2027-01-01T00:00:00Z"
    assert out.verdict.fields.ray_cluster_name == "viggo-ft-abc"


def test_children_applied_by_a_differently_configured_operator_are_built_again():
    obs = finetune_obs(ray=ray_job(), status={"startTime": "2027-01-01T00:00:00Z"})
    other = BuildContext(settings=Settings(cloud="gke"), payloads=CTX.payloads)
    assert memo(obs, ctx=other) != memo(obs)
    applied = finetune_obs(ray=ray_job(), status={"startTime": "2027-01-01T00:00:00Z"},
                           applied_for=memo(obs, ctx=other))
    assert finetune.decide(applied, CTX).children, "a set built from other settings must be built again"


def test_a_finished_run_keeps_its_status_and_is_never_started_again():
    status = {"phase": "Succeeded", "observedGeneration": 1, "message": "FineTune finished",
              "conditions": [READY], "adapter": {"uri": "s3://a"}}
    out = finetune.decide(finetune_obs(status=status), CTX)
    assert out.children == [] and (out.verdict.phase, out.verdict.reason) == ("Succeeded", "Succeeded")
    assert out.verdict.fields.wire() == {"adapter": {"uri": "s3://a"}}


def test_a_new_generation_of_a_finished_run_is_judged_again():
    status = {"phase": "Failed", "observedGeneration": 1, "conditions": [READY]}
    obs = JobObservation(owner("FineTune", "viggo", generation=2), FineTuneStatus.read(status),
                         FineTuneSpec.model_validate(example("finetune")["spec"]), now=NOW)
    assert finetune.decide(obs, CTX).verdict.reason == "Creating"


def test_the_report_of_a_finished_job_makes_it_succeeded_with_its_adapter_and_figures():
    report = {"state": "Succeeded", "message": "trained",
              "adapter": {"uri": "s3://llmops-demo/adapters/viggo", "rank": 8}, "metrics": {"trainLoss": 0.25}}
    out = finetune.decide(finetune_obs(ray=ray_job("Complete", "SUCCEEDED"), report=report,
                                       status={"startTime": "2027-01-01T00:00:00Z"}), CTX)
    assert (out.verdict.phase, out.verdict.state) == ("Succeeded", "ready")
    assert out.verdict.fields.adapter.wire() == {"uri": "s3://llmops-demo/adapters/viggo", "rank": 8}
    assert out.verdict.fields.metrics.wire() == {"trainLoss": 0.25}
    assert out.verdict.fields.completion_time == rfc3339(NOW)


def test_a_started_job_whose_rayjob_is_gone_fails_once_the_api_server_confirms_it():
    out = finetune.decide(finetune_obs(status={"startTime": "2027-01-01T00:00:00Z"}), CTX)
    assert out.verdict.reason == "RayJobDeleted" and out.children == []
    assert out.confirm_absent == ("ray.io/v1", "RayJob", "viggo-ft")


@pytest.mark.parametrize("workload, again", [(None, WORKLOAD_WAIT_SECONDS),
                                             ({"status": {"conditions": []}}, QUEUE_RECHECK_SECONDS)])
def test_a_queued_job_says_so_and_reads_its_workload_again(workload, again):
    spec = {**example("finetune")["spec"], "queueName": "gpu"}
    out = finetune.decide(finetune_obs(spec=spec, ray=ray_job("Suspended", ""), queued_on="ray-uid",
                                       workload=workload, applied_for=memo(finetune_obs())), CTX)
    assert (out.verdict.phase, out.queued, out.requeue_after) == ("Queued", "ray-uid", again)


# ---- BatchInference -------------------------------------------------------------------------------------------
def batch_obs(fine_tune: dict[str, Any] | None, created: str | None = None, **fields: Any
              ) -> BatchInferenceObservation:
    """`fine_tune`: the referenced FineTune's body, read the way observe reads it."""
    spec = BatchInferenceSpec.model_validate(example("batchinference")["spec"])
    seen = FineTuneSeen(FineTuneStatus.read(fine_tune.get("status")),
                        fine_tune["spec"]["baseModel"]["source"]) if fine_tune else None
    return BatchInferenceObservation(owner("BatchInference", "viggo-eval"),
                                     BatchInferenceStatus.read(fields.pop("status", {})), spec,
                                     now=NOW, fine_tune=seen, created=created, **fields)


def fine_tune_with(status: dict[str, Any]) -> dict[str, Any]:
    return {**example("finetune"), "status": status}


@pytest.mark.parametrize("created, state", [(rfc3339(NOW - 60), "progressing"), (rfc3339(NOW - 86400), "stalled")])
def test_a_missing_finetune_is_waited_for_a_while_then_stalls(created, state):
    out = batchinference.decide(batch_obs(None, created), CTX)
    assert (out.verdict.reason, out.verdict.state, out.children) == ("FineTuneNotFound", state, [])


@pytest.mark.parametrize("status, reason, state", [
    ({"phase": "Running", "message": "Training: step 3/10"}, "WaitingForFineTune", "progressing"),
    ({"phase": "Failed", "message": "out of memory"}, "FineTuneFailed", "stalled"),
])
def test_a_finetune_not_done_holds_the_job_back(status, reason, state):
    out = batchinference.decide(batch_obs(fine_tune_with(status)), CTX)
    assert (out.verdict.reason, out.verdict.state, out.children) == (reason, state, [])
    # waiting, it reads the FineTune again on its own too: a missed wake-up must not leave it waiting for good
    assert out.requeue_after == (DEPENDENCY_RECHECK_SECONDS if state == "progressing" else None)


def test_a_succeeded_finetune_gives_the_job_its_base_model_and_adapter():
    ft = fine_tune_with({"phase": "Succeeded", "conditions": [READY],
                         "adapter": {"uri": "s3://llmops-demo/adapters/viggo", "rank": 8}})
    out = batchinference.decide(batch_obs(ft), CTX)
    assert "RayJob" in [c["kind"] for c in out.children]
    assert out.verdict.fields.model_source == ft["spec"]["baseModel"]["source"]
    assert out.verdict.fields.adapter_uri == "s3://llmops-demo/adapters/viggo"


def test_a_started_job_runs_on_the_adapter_it_resolved_even_once_its_finetune_is_gone():
    status = {"startTime": "2027-01-01T00:00:00Z", "modelSource": "Qwen/x", "adapterURI": "s3://old"}
    out = batchinference.decide(batch_obs(None, ray=ray_job(), status=status), CTX)
    assert out.verdict.reason == "JobRunning"
    assert (out.verdict.fields.model_source, out.verdict.fields.adapter_uri) == ("Qwen/x", "s3://old")


# ---- LLMService -----------------------------------------------------------------------------------------------
def service_obs(**fields: Any) -> ServiceObservation:
    spec = {**example("llmservice")["spec"], **fields.pop("spec", {})}
    return ServiceObservation(owner("LLMService", "viggo-serve"), LLMServiceStatus.read(fields.pop("status", {})),
                              LLMServiceSpec.model_validate(spec), now=NOW, **fields)


def test_a_suspended_service_removes_its_rayservice_and_what_it_exposed():
    out = llmservice.decide(service_obs(spec={"suspend": True}, status={"routeName": "viggo-serve-llm"}), CTX)
    assert (out.verdict.phase, out.children) == ("Suspended", [])
    assert [d[1] for d in out.delete] == ["HTTPRoute", "RayService"]


@pytest.mark.parametrize("fine_tunes, state", [({"viggo": FineTuneStatus(phase="Running")}, "WaitingForFineTune"),
                                                ({}, "Failed")], ids=["running", "missing"])
def test_a_service_serves_the_base_while_its_adapter_cannot_be_served(fine_tunes, state):
    out = llmservice.decide(service_obs(fine_tunes=fine_tunes), CTX)
    assert out.ray_kind == "RayService" and "RayService" in [c["kind"] for c in out.children]
    assert [a.state for a in out.verdict.fields.adapters] == [state]
    assert out.requeue_after == (DEPENDENCY_RECHECK_SECONDS if state == "WaitingForFineTune" else None)


def test_exposure_without_the_gateway_api_stalls_and_exposes_nothing():
    out = llmservice.decide(service_obs(spec={"expose": {"hostnames": ["llm.example.com"],
                                                         "gateway": {"name": "gw"}}}, unserved=(HTTP_ROUTE,)), CTX)
    assert (out.verdict.reason, out.verdict.state) == ("GatewayAPIMissing", "stalled")
    assert "HTTPRoute" not in [c["kind"] for c in out.children] and out.verdict.fields.route_name is None


def test_decide_imports_no_engine_cache_or_client():
    code = ("import sys; import llmops.decide.finetune, llmops.decide.batchinference, llmops.decide.llmservice; "
            "print(sorted(m for m in sys.modules if m.startswith(('llmops.handlers', 'llmops.kube', 'kopf'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_an_accelerator_the_cloud_lacks_stalls_the_job_and_builds_nothing():
    spec = example("finetune")["spec"]
    spec = {**spec, "resources": {**spec["resources"], "accelerator": "A10G"}}   # an AWS GPU: no GKE machine has it
    out = finetune.decide(finetune_obs(spec=spec), BuildContext(settings=Settings(cloud="gke"), payloads={}))
    assert (out.verdict.reason, out.verdict.state, out.children) == ("UnknownAccelerator", "stalled", [])
    assert "'A10G' is not a profile of this operator (cloud gke)" in out.verdict.message


def test_a_retried_attempt_keeps_running_and_counts_its_retries():
    spec = {**example("finetune")["spec"], "backoffLimit": 2}
    out = finetune.decide(finetune_obs(spec=spec, ray=ray_job("Retrying", "FAILED", failed=1),
                                       status={"startTime": "2027-01-01T00:00:00Z"},
                                       applied_for=memo(finetune_obs())), CTX)
    assert (out.verdict.phase, out.verdict.state) == ("Running", "progressing")
    assert out.verdict.fields.retries.wire() == {"used": 1, "limit": 2}


# ---- a Ray cluster short of pods ----------------------------------------------------------------------------
def initializing() -> dict[str, Any]:
    """The RayJob as the cache holds it: its status, no spec (ray_entries keeps none)."""
    return ray_job("Initializing", "")


WHOLE = 1 + example("finetune")["spec"]["resources"]["workers"]   # the head and spec.resources.workers


def test_a_cluster_short_of_pods_is_looked_at_once_its_pods_are_late_and_not_before():
    started = {"startTime": rfc3339(NOW - 10)}
    early = finetune.decide(finetune_obs(status=started, ray=initializing(), ray_pods=1, applied_for="x"), CTX)
    assert early.verdict.reason == "RayClusterStarting" and early.check_cluster is None
    assert early.requeue_after == pytest.approx(PODS_LATE_SECONDS - 10 + 1)   # no event may come: a timer
    for short in (0, 1, WHOLE - 1):   # no pod, the head alone (a GPU quota refusing the workers), one worker short
        late = finetune.decide(finetune_obs(status={"startTime": rfc3339(NOW - 90)}, ray=initializing(),
                                            ray_pods=short, applied_for="x"), CTX)
        assert late.check_cluster == "viggo-ft-abc" and late.requeue_after == PODS_LATE_SECONDS, short
    whole = finetune.decide(finetune_obs(status={"startTime": rfc3339(NOW - 90)}, ray=initializing(), ray_pods=WHOLE,
                                         applied_for="x"), CTX)
    assert whole.check_cluster is None and whole.requeue_after is None, "every pod there: nothing to ask"


def test_pods_kubernetes_refuses_stall_the_job_until_they_are_there():
    why = PodProblem(PODS_REFUSED, 'pods "viggo-ft-abc-head" is forbidden: violates PodSecurity "restricted:latest"',
                     "viggo-ft-abc")
    refused = finetune.decide(finetune_obs(status={"startTime": rfc3339(NOW - 90)}, ray=initializing(), ray_pods=0,
                                           problems=(why,), applied_for="x"), CTX)
    assert (refused.verdict.phase, refused.verdict.state, refused.verdict.reason) == ("Pending", "stalled",
                                                                                       PODS_REFUSED)
    assert "violates PodSecurity" in refused.verdict.message and refused.check_cluster == "viggo-ft-abc"
    created = finetune.decide(finetune_obs(status={"startTime": rfc3339(NOW - 90)}, ray=initializing(), ray_pods=WHOLE,
                                           problems=(why,), applied_for="x"), CTX)
    assert created.verdict.reason == "RayClusterStarting", "a refusal read before the pods came is old news"
