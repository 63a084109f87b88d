"""Status mapping: KubeRay's RayJob/RayService status and the payload report -> phase, conditions, messages."""

from __future__ import annotations

import ast
import datetime
from pathlib import Path

import pytest

from llmops.status import (
    DEPENDENCY_GRACE_SECONDS,
    SCALE_UP_GRACE_SECONDS,
    WRITTEN,
    PodProblem,
    Retries,
    Verdict,
    conditions_for,
    job_verdict,
    pod_problems,
    result_report,
    service_verdict,
)

OPERATOR = Path(__file__).resolve().parents[2] / "operator" / "llmops"
T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc).timestamp()
SINCE = "2026-01-01T00:00:00Z"   # T0
GPU_SHORT = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: not eligible due to scheduling.."


def rayjob(deployment="", job="", reason="", message="", **extra):
    return {"status": {"jobDeploymentStatus": deployment, "jobStatus": job, "reason": reason, "message": message,
                       **extra}}


@pytest.mark.parametrize("ray,report,problems,suspended,expected", [
    (None, {}, [], False, ("Pending", "progressing", "Creating")),
    (None, {}, [], True, ("Suspended", "suspended", "Suspended")),
    (rayjob("Initializing"), {}, [], False, ("Pending", "progressing", "RayClusterStarting")),
    (rayjob("Running", "RUNNING"), {"progress": {"epoch": 1.5}}, [], False, ("Running", "progressing", "JobRunning")),
    (rayjob("Suspended"), {}, [], True, ("Suspended", "suspended", "Suspended")),
    # Resumed, KubeRay not there yet: in progress, never Suspended (kstatus would read that as settled).
    (rayjob("Suspended"), {}, [], False, ("Pending", "progressing", "RayClusterStarting")),
    (rayjob("Suspending"), {}, [], False, ("Pending", "progressing", "RayClusterStarting")),
    (rayjob("Retrying", failed=1), {}, [], False, ("Running", "progressing", "Retrying")),
    (rayjob("Failed", "FAILED", "DeadlineExceeded"), {}, [], False, ("Failed", "stalled", "DeadlineExceeded")),
    (rayjob("Failed", "FAILED", "AppFailed", "exit 1"), {}, [], False, ("Failed", "stalled", "AppFailed")),
    (rayjob("ValidationFailed", message="bad spec"), {}, [], False, ("Failed", "stalled", "RayJobInvalid")),
    (rayjob("Complete", "SUCCEEDED"), {}, [], False, ("Failed", "stalled", "NoResultReported")),
    (rayjob("Running", "RUNNING"), {"state": "Succeeded", "message": "done"}, [], False,
     ("Succeeded", "ready", "Succeeded")),
    (rayjob("Running", "RUNNING"), {"state": "Failed", "message": "no field 'input'"}, [], False,
     ("Failed", "stalled", "PayloadFailed")),
    (rayjob("Initializing"), {}, [PodProblem("Unschedulable", "0/3 nodes: Insufficient nvidia.com/gpu", "w-1", SINCE)],
     False, ("Pending", "progressing", "Unschedulable")),
    (rayjob("Failed", "FAILED", "SomethingNew"), {}, [], False, ("Failed", "stalled", "JobFailed")),
    (rayjob("Initializing"), {}, [PodProblem("ImagePullBackOff", "not found", "h-1")], False,
     ("Pending", "stalled", "ImagePullFailed")),
    (rayjob("Initializing"), {}, [PodProblem("CreateContainerConfigError", 'secret "hf" not found', "h-1")], False,
     ("Pending", "stalled", "ContainerConfigError")),
])
def test_job_verdicts(ray, report, problems, suspended, expected):
    verdict = job_verdict("FineTune", suspended, ray, report, problems, T0 + 60)
    assert (verdict.phase, verdict.state, verdict.reason) == expected
    assert verdict.message


def test_messages_say_what_to_do():
    deadline = job_verdict("FineTune", False, rayjob("Failed", "FAILED", "DeadlineExceeded"), {}, [])
    assert "activeDeadlineSeconds" in deadline.message
    stuck = job_verdict("FineTune", False, rayjob("Initializing"), {},
                        [PodProblem("Unschedulable", GPU_SHORT, "w", SINCE)], T0 + 60)
    assert "spec.resources" in stuck.message and "Insufficient nvidia.com/gpu" in stuck.message
    assert ".." not in stuck.message and "scheduling. A node pool" in stuck.message, stuck.message
    pull = job_verdict("FineTune", False, rayjob("Initializing"), {}, [PodProblem("ErrImagePull", "denied", "h")])
    assert "spec.image" in pull.message
    # the kubelet's words (pkg/kubelet/kuberuntime/security_context_others.go) for a root image under runAsNonRoot
    root = job_verdict("FineTune", False, rayjob("Initializing"), {}, [PodProblem(
        "CreateContainerConfigError", "container has runAsNonRoot and image will run as root "
        "(pod: \"h_ns(uid)\", container: ray-head)", "h")])
    assert "ray_pod_security: baseline" in root.message and "USER is numeric" in root.message, root.message
    secret = job_verdict("FineTune", False, rayjob("Initializing"), {},
                         [PodProblem("CreateContainerConfigError", 'secret "hf" not found', "h")])
    assert 'secret "hf" not found' in secret.message and "spec.secrets" in secret.message, secret.message


def test_conditions_move_transition_time_only_on_flips():
    running = Verdict("Running", "progressing", "JobRunning", "running")
    first = conditions_for(running, 1, None, "2026-01-01T00:00:00Z")
    again = conditions_for(Verdict("Running", "progressing", "JobRunning", "running (epoch 2)"), 1, first,
                           "2026-01-01T00:05:00Z")
    assert [c["lastTransitionTime"] for c in again] == ["2026-01-01T00:00:00Z"] * 3
    assert [c["type"] for c in again] == ["Ready", "Reconciling", "Stalled"]
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
    (rayservice("True", upgrading="True"), [PodProblem("Unschedulable", "Insufficient nvidia.com/gpu", "w", SINCE)],
     "NewCluster", ("Upgrading", "progressing", "UpgradeCannotFit")),
    (rayservice("True", upgrading="True"), [PodProblem("Unschedulable", "Insufficient", "w", "2025-12-31T00:00:00Z")],
     "NewCluster", ("Upgrading", "stalled", "UpgradeCannotFit")),
    (rayservice(apps={"llm": {"status": "DEPLOY_FAILED", "message": "no adapter"}}), [], "NewCluster",
     ("Failed", "stalled", "ServeApplicationFailed")),
    (rayservice(), [PodProblem("Unschedulable", "Insufficient nvidia.com/gpu", "w", SINCE)], "None",
     ("Pending", "progressing", "Unschedulable")),
    (rayservice(), [PodProblem("Unschedulable", "Insufficient nvidia.com/gpu", "w", "2025-12-31T23:00:00Z")], "None",
     ("Pending", "stalled", "Unschedulable")),
])
def test_service_verdicts(service, problems, strategy, expected):
    verdict = service_verdict(service, "1/1 adapters served (viggo)", problems, strategy, T0 + 60)
    assert (verdict.phase, verdict.state, verdict.reason) == expected


def test_upgrade_that_cannot_fit_names_the_fix():
    verdict = service_verdict(rayservice("True", upgrading="True"),
                              "", [PodProblem("Unschedulable", "Insufficient nvidia.com/gpu", "w", SINCE)],
                              "NewCluster", T0 + 60)
    assert "twice the GPUs" in verdict.message and "upgradeStrategy" in verdict.message


def test_finished_job_waits_a_grace_period_for_its_report():
    import datetime
    end = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    job = rayjob("Complete", "SUCCEEDED", endTime="2026-01-01T00:00:00Z")
    soon = job_verdict("FineTune", False, job, {}, [], end.timestamp() + 5)
    assert (soon.phase, soon.state, soon.reason) == ("Running", "progressing", "CollectingResult")
    late = job_verdict("FineTune", False, job, {}, [], end.timestamp() + 600)
    assert (late.phase, late.reason) == ("Failed", "NoResultReported")


def test_pod_problems_keep_when_a_pod_became_unschedulable():
    pod = {"metadata": {"name": "w"}, "status": {"conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "no GPUs",
         "lastTransitionTime": SINCE}]}}
    assert pod_problems([pod]) == [PodProblem("Unschedulable", "no GPUs", "w", SINCE)]


def test_unschedulable_waits_a_scale_up_then_stalls():
    """A GPU node pool scaling up leaves pods unschedulable for minutes: Reconciling (reason Unschedulable, a
    recheck when the grace period ends), Stalled only once it has lasted SCALE_UP_GRACE_SECONDS."""
    problems = [PodProblem("Unschedulable", GPU_SHORT, "w-1", "2026-01-01T00:02:00Z"),
                PodProblem("Unschedulable", GPU_SHORT, "w-0", SINCE)]   # waiting longest: the one named
    waiting = job_verdict("FineTune", False, rayjob("Initializing"), {}, problems, T0 + 100)
    assert (waiting.state, waiting.reason) == ("progressing", "Unschedulable")
    assert waiting.recheck_after == pytest.approx(SCALE_UP_GRACE_SECONDS - 100 + 1)
    assert "pod w-0" in waiting.message and "until 2026-01-01T00:10:00Z" in waiting.message, waiting.message
    stalled = job_verdict("FineTune", False, rayjob("Initializing"), {}, problems, T0 + SCALE_UP_GRACE_SECONDS + 1)
    assert (stalled.state, stalled.reason, stalled.recheck_after) == ("stalled", "Unschedulable", None)
    assert "for 10 minutes" in stalled.message and "spec.resources" in stalled.message
    # The message stays the same while it waits (no countdown): the status is not rewritten every reconcile.
    assert job_verdict("FineTune", False, rayjob("Initializing"), {}, problems, T0 + 200).message == waiting.message


@pytest.mark.parametrize("ray,suspended", [(None, False), (None, True),
                                           ({"metadata": {"deletionTimestamp": SINCE}, "status": {}}, False)])
def test_a_started_job_whose_rayjob_is_gone_fails_saying_who_can_do_what(ray, suspended):
    verdict = job_verdict("BatchInference", suspended, ray, {}, [], T0, started=True, ray_name="eval-bi")
    assert (verdict.phase, verdict.state, verdict.reason) == ("Failed", "stalled", "RayJobDeleted")
    assert "RayJob eval-bi was deleted" in verdict.message
    assert "delete this BatchInference and create it again" in verdict.message and "spec.suspend" in verdict.message


def test_a_report_outlives_its_deleted_rayjob():
    """KubeRay's ttlSecondsAfterFinished deletes a finished RayJob: the report still says how it ended."""
    verdict = job_verdict("FineTune", False, None, {"state": "Succeeded", "message": "done"}, [], T0, started=True)
    assert verdict.reason == "Succeeded"
    assert job_verdict("FineTune", False, None, {}, [], T0, started=False).reason == "Creating"


def test_suspended_has_suspended_in_place_of_ready():
    """kstatus reads Ready=False as in progress: a suspended resource has no Ready, and Suspended=True."""
    suspended = conditions_for(Verdict("Suspended", "suspended", "Suspended", "paused"), 2, None, SINCE)
    assert [(c["type"], c["status"], c["reason"]) for c in suspended] == [
        ("Suspended", "True", "Suspended"), ("Reconciling", "False", "Suspended"), ("Stalled", "False", "Suspended")]
    resumed = conditions_for(Verdict("Running", "progressing", "JobRunning", "running"), 3, suspended,
                             "2026-01-01T01:00:00Z")
    assert [c["type"] for c in resumed] == ["Ready", "Reconciling", "Stalled"]
    assert {c["type"]: c["lastTransitionTime"] for c in resumed} == {
        "Ready": "2026-01-01T01:00:00Z", "Reconciling": "2026-01-01T01:00:00Z", "Stalled": SINCE}


def _literal(node: ast.expr) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def test_written_lists_every_verdict_the_code_makes():
    """Every Verdict(phase, state, reason, ...) in the operator's code whose arguments are written out is a row of
    WRITTEN (arguments computed at run time match any), and every reason in WRITTEN occurs in the code."""
    table = {(w.phase, w.state, w.reason) for w in WRITTEN}
    states = {"ready", "progressing", "stalled", "suspended"}
    made, source = [], ""
    for path in sorted(OPERATOR.rglob("*.py")):
        text = path.read_text()
        source += text
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Verdict" and len(node.args) >= 3:
                made.append((f"{path.name}:{node.lineno}", *(_literal(a) for a in node.args[:3])))
    assert len(made) > 30
    for where, phase, state, reason in made:
        assert state is None or state in states, where
        matches = [t for t in table if phase in (None, t[0]) and state in (None, t[1]) and reason in (None, t[2])]
        assert matches, f"{where}: Verdict({phase}, {state}, {reason}) is not in status.WRITTEN"
    assert all(f'"{w.reason}"' in source for w in WRITTEN), [w.reason for w in WRITTEN
                                                            if f'"{w.reason}"' not in source]


def test_grace_periods_are_what_the_docs_say():
    doc = (OPERATOR.parents[1] / "docs" / "gitops.md").read_text()
    assert f"`Unschedulable` (for up to {int(SCALE_UP_GRACE_SECONDS // 60)} minutes)" in doc
    assert f"`FineTuneNotFound` (for up to {int(DEPENDENCY_GRACE_SECONDS // 60)} minutes" in doc


def test_a_whole_float_read_back_as_an_integer_is_the_same_status():
    from llmops.status import same_status

    assert same_status({"metrics": {"exactMatch": 1, "rows": 10}}, {"metrics": {"exactMatch": 1.0, "rows": 10}})
    assert not same_status({"metrics": {"exactMatch": 1}}, {"metrics": {"exactMatch": 0.5}})


LOST = PodProblem("Preempted", "Pod was terminated in response to imminent node shutdown.", "ft-w-1", SINCE)
BUDGET = Retries(limit=2, used=0, resumes=True)


def test_a_pod_that_goes_away_with_its_node_is_a_preemption():
    def pod(name, **status):
        return {"metadata": {"name": name}, "status": status}

    gone = pod("a", conditions=[{"type": "DisruptionTarget", "status": "True", "reason": "DeletionByPodGC",
                                 "message": "PodGC: node no longer exists", "lastTransitionTime": SINCE}])
    shutdown = pod("b", phase="Failed", reason="Terminated", message="Pod was terminated in response to imminent "
                                                                    "node shutdown.")
    drained = pod("c", conditions=[{"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}])
    stopping = pod("d", conditions=[{"type": "DisruptionTarget", "status": "False", "reason": "DeletionByPodGC"}])
    assert pod_problems([gone, shutdown, drained, stopping]) == [
        PodProblem("Preempted", "PodGC: node no longer exists", "a", SINCE),
        PodProblem("Preempted", "Pod was terminated in response to imminent node shutdown.", "b"),
        PodProblem("Preempted", "it was evicted, as a node drain does (a spot interruption handler, a scale-in)",
                   "c")]


def test_preempted_then_resuming_while_retries_remain():
    running = rayjob("Running", "RUNNING")
    preempted = job_verdict("FineTune", False, running, {}, [LOST], T0, retries=BUDGET)
    assert (preempted.phase, preempted.state, preempted.reason) == ("Running", "progressing", "Preempted")
    assert "ft-w-1" in preempted.message and "0 of 2 retries used" in preempted.message
    assert "resumes from the last complete checkpoint" in preempted.message
    # The lost pod is soon deleted; until the Ray job notices, the status stays Preempted.
    still = job_verdict("FineTune", False, running, {}, [], T0, retries=BUDGET, previous_reason="Preempted",
                        previous_used=0)
    assert still.reason == "Preempted"
    # The attempt's driver reports Failed when its worker dies: with a retry left, that is no failure.
    reported = job_verdict("FineTune", False, running, {"state": "Failed", "message": "ActorDiedError"}, [], T0,
                           retries=BUDGET, previous_reason="Preempted", previous_used=0)
    assert reported.reason == "Preempted"
    after = Retries(limit=2, used=1, resumes=True)
    for ray in (rayjob("Retrying", "FAILED", "AppFailed", failed=1), rayjob("New", failed=1),
                rayjob("Initializing", failed=1)):
        resuming = job_verdict("FineTune", False, ray, {"state": "Failed"}, [], T0, retries=after,
                               previous_reason="Preempted", previous_used=0)
        assert (resuming.phase, resuming.state, resuming.reason) == ("Running", "progressing", "Resuming"), ray
        assert "1 of 2 retries used" in resuming.message
    again = job_verdict("FineTune", False, rayjob("Running", "RUNNING", failed=1), {"progress": {"step": 4}}, [],
                        T0, retries=after, previous_reason="Resuming", previous_used=1)
    assert again.reason == "JobRunning" and "attempt 2, 1 of 2 retries used" in again.message
    batch = job_verdict("BatchInference", False, rayjob("Retrying", failed=1), {}, [], T0,
                        retries=Retries(limit=1, used=1))
    assert batch.reason == "Retrying" and "runs the job again" in batch.message


def test_without_retries_left_a_preemption_says_so_and_the_failure_is_final():
    spent = Retries(limit=1, used=1, resumes=True)
    preempted = job_verdict("FineTune", False, rayjob("Running", "RUNNING", failed=1), {}, [LOST], T0,
                            retries=spent)
    assert preempted.reason == "Preempted" and "spec.backoffLimit" in preempted.message
    failed = job_verdict("FineTune", False, rayjob("Failed", "FAILED", "AppFailed", failed=2),
                         {"state": "Failed", "message": "a worker died"}, [], T0, retries=Retries(1, 2, True))
    assert (failed.phase, failed.reason, failed.message) == ("Failed", "PayloadFailed", "a worker died")
    none = job_verdict("FineTune", False, rayjob("Running", "RUNNING"), {}, [LOST], T0)
    assert none.reason == "Preempted" and "0 of 0 retries used" in none.message


def test_a_failed_attempt_with_a_retry_left_reads_as_the_retry_to_come():
    verdict = job_verdict("FineTune", False, rayjob("Running", "RUNNING"), {"state": "Failed", "message": "OOM."},
                          [], T0, retries=BUDGET)
    assert (verdict.phase, verdict.state, verdict.reason) == ("Running", "progressing", "Resuming")
    assert "attempt 1 failed (OOM)" in verdict.message and "0 of 2 retries used" in verdict.message


def test_a_verdicts_fields_merge_into_the_more_specific_status_model():
    from llmops.api.common import ModelCacheStatus, StatusBase
    from llmops.api.finetune import FineTuneStatus
    from llmops.status import Verdict

    cache = ModelCacheStatus(state="Cached", claim_name="c", source="m", job_name="c")
    job = Verdict("Running", "progressing", "JobRunning", "running", FineTuneStatus(ray_job_name="a"))
    both = job.with_fields(StatusBase(model_cache=cache))
    assert isinstance(both.fields, FineTuneStatus)
    assert both.fields.wire() == {"rayJobName": "a", "modelCache": cache.wire()}
    assert job.fields.model_cache is None   # verdicts are values: the first one is unchanged
    later = both.with_fields(FineTuneStatus(ray_job_name="b"))
    assert later.fields.ray_job_name == "b" and later.fields.model_cache == cache
