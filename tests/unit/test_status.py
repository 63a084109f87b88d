"""Status mapping: KubeRay's RayJob/RayService status and the payload report -> phase, conditions, messages."""

from __future__ import annotations

import pytest

from llmops.status import (
    PodProblem,
    Verdict,
    conditions_for,
    job_verdict,
    pod_problems,
    result_report,
    service_verdict,
)


def rayjob(deployment="", job="", reason="", message="", **extra):
    return {"status": {"jobDeploymentStatus": deployment, "jobStatus": job, "reason": reason, "message": message,
                       **extra}}


@pytest.mark.parametrize("ray,report,problems,suspended,expected", [
    (None, {}, [], False, ("Pending", "progressing", "Creating")),
    (None, {}, [], True, ("Suspended", "idle", "Suspended")),
    (rayjob("Initializing"), {}, [], False, ("Pending", "progressing", "RayClusterStarting")),
    (rayjob("Running", "RUNNING"), {"progress": {"epoch": 1.5}}, [], False, ("Running", "progressing", "JobRunning")),
    (rayjob("Suspended"), {}, [], True, ("Suspended", "idle", "Suspended")),
    (rayjob("Retrying", failed=1), {}, [], False, ("Running", "progressing", "Retrying")),
    (rayjob("Failed", "FAILED", "DeadlineExceeded"), {}, [], False, ("Failed", "stalled", "DeadlineExceeded")),
    (rayjob("Failed", "FAILED", "AppFailed", "exit 1"), {}, [], False, ("Failed", "stalled", "AppFailed")),
    (rayjob("ValidationFailed", message="bad spec"), {}, [], False, ("Failed", "stalled", "RayJobInvalid")),
    (rayjob("Complete", "SUCCEEDED"), {}, [], False, ("Failed", "stalled", "NoResultReported")),
    (rayjob("Running", "RUNNING"), {"state": "Succeeded", "message": "done"}, [], False,
     ("Succeeded", "ready", "Succeeded")),
    (rayjob("Running", "RUNNING"), {"state": "Failed", "message": "no field 'input'"}, [], False,
     ("Failed", "stalled", "PayloadFailed")),
    (rayjob("Initializing"), {}, [PodProblem("Unschedulable", "0/3 nodes: Insufficient nvidia.com/gpu", "w-1")],
     False, ("Pending", "stalled", "Unschedulable")),
    (rayjob("Initializing"), {}, [PodProblem("ImagePullBackOff", "not found", "h-1")], False,
     ("Pending", "stalled", "ImagePullFailed")),
])
def test_job_verdicts(ray, report, problems, suspended, expected):
    verdict = job_verdict("FineTune", suspended, ray, report, problems)
    assert (verdict.phase, verdict.state, verdict.reason) == expected
    assert verdict.message


def test_messages_say_what_to_do():
    deadline = job_verdict("FineTune", False, rayjob("Failed", "FAILED", "DeadlineExceeded"), {}, [])
    assert "activeDeadlineSeconds" in deadline.message
    stuck = job_verdict("FineTune", False, rayjob("Initializing"), {},
                        [PodProblem("Unschedulable", "Insufficient nvidia.com/gpu", "w")])
    assert "spec.resources" in stuck.message and "Insufficient nvidia.com/gpu" in stuck.message
    pull = job_verdict("FineTune", False, rayjob("Initializing"), {}, [PodProblem("ErrImagePull", "denied", "h")])
    assert "spec.image" in pull.message


def test_conditions_move_transition_time_only_on_flips():
    running = Verdict("Running", "progressing", "JobRunning", "running")
    first = conditions_for(running, 1, None, "2026-01-01T00:00:00Z")
    again = conditions_for(Verdict("Running", "progressing", "JobRunning", "running (epoch 2)"), 1, first,
                           "2026-01-01T00:05:00Z")
    assert [c["lastTransitionTime"] for c in again] == ["2026-01-01T00:00:00Z"] * 3
    done = conditions_for(Verdict("Succeeded", "ready", "Succeeded", "done"), 1, again, "2026-01-01T00:10:00Z")
    by_type = {c["type"]: c for c in done}
    assert by_type["Ready"]["status"] == "True" and by_type["Ready"]["lastTransitionTime"] == "2026-01-01T00:10:00Z"
    assert by_type["Stalled"]["lastTransitionTime"] == "2026-01-01T00:00:00Z"   # False before and after
    assert all(c["observedGeneration"] == 1 for c in done)


def test_result_report_decodes_json_and_ignores_garbage():
    report = result_report({"state": "Succeeded", "metrics": '{"exactMatch": 0.688}', "progress": "{not json"})
    assert report == {"state": "Succeeded", "metrics": {"exactMatch": 0.688}}


def test_pod_problems_from_pod_status():
    pods = [
        {"metadata": {"name": "a"}, "status": {"conditions": [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "no GPUs"}]}},
        {"metadata": {"name": "b"}, "status": {"containerStatuses": [
            {"state": {"waiting": {"reason": "ImagePullBackOff", "message": "pull denied"}}}]}},
        {"metadata": {"name": "c"}, "status": {"phase": "Running"}},
    ]
    assert pod_problems(pods) == [PodProblem("Unschedulable", "no GPUs", "a"),
                                  PodProblem("ImagePullBackOff", "pull denied", "b")]


def rayservice(ready="False", reason="Initializing", upgrading="False", apps=None):
    return {"status": {"conditions": [{"type": "Ready", "status": ready, "reason": reason},
                                      {"type": "UpgradeInProgress", "status": upgrading}],
                       "activeServiceStatus": {"applicationStatuses": apps or {}}}}


@pytest.mark.parametrize("service,problems,strategy,expected", [
    (None, [], "NewCluster", ("Pending", "progressing", "Creating")),
    (rayservice(), [], "NewCluster", ("Pending", "progressing", "Initializing")),
    (rayservice("True", "NonZeroServeEndpoints", apps={"llm": {"status": "RUNNING"}}), [], "NewCluster",
     ("Ready", "ready", "Serving")),
    (rayservice("True", upgrading="True"), [], "NewCluster", ("Upgrading", "progressing", "UpgradeInProgress")),
    (rayservice("True", upgrading="True"), [PodProblem("Unschedulable", "Insufficient nvidia.com/gpu", "w")],
     "NewCluster", ("Upgrading", "stalled", "UpgradeCannotFit")),
    (rayservice(apps={"llm": {"status": "DEPLOY_FAILED", "message": "no adapter"}}), [], "NewCluster",
     ("Failed", "stalled", "ServeApplicationFailed")),
    (rayservice(), [PodProblem("Unschedulable", "Insufficient nvidia.com/gpu", "w")], "None",
     ("Pending", "stalled", "Unschedulable")),
])
def test_service_verdicts(service, problems, strategy, expected):
    verdict = service_verdict(service, "1/1 adapters served (viggo)", problems, strategy)
    assert (verdict.phase, verdict.state, verdict.reason) == expected


def test_upgrade_that_cannot_fit_names_the_fix():
    verdict = service_verdict(rayservice("True", upgrading="True"),
                              "", [PodProblem("Unschedulable", "Insufficient nvidia.com/gpu", "w")], "NewCluster")
    assert "twice the GPUs" in verdict.message and "upgradeStrategy" in verdict.message


def test_finished_job_waits_a_grace_period_for_its_report():
    import datetime
    end = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    job = rayjob("Complete", "SUCCEEDED", endTime="2026-01-01T00:00:00Z")
    soon = job_verdict("FineTune", False, job, {}, [], end.timestamp() + 5)
    assert (soon.phase, soon.state, soon.reason) == ("Running", "progressing", "CollectingResult")
    late = job_verdict("FineTune", False, job, {}, [], end.timestamp() + 600)
    assert (late.phase, late.reason) == ("Failed", "NoResultReported")
