"""Kueue queueing, the pure parts: what the RayJob carries with spec.queueName, and the Queued status."""

from __future__ import annotations

import pytest

from llmops.api.finetune import FineTuneSpec
from llmops.builders.common import QUEUE_LABEL, BuildContext, load_payloads
from llmops.render import render_manifests
from llmops.settings import Settings
from llmops.status import queued_verdict
from manifests import batchinference, finetune


def _rayjob(body):
    objects, errors = render_manifests([body], BuildContext(settings=Settings(), payloads=load_payloads()))
    assert not errors, errors
    return next(o for o in objects if o["kind"] == "RayJob")


def _queued(body, **spec):
    body["spec"].update(queueName="gpu", **spec)
    return body


@pytest.mark.parametrize("make", [finetune, batchinference])
def test_a_queued_job_names_its_queue_and_leaves_suspend_to_kueue(make):
    job = _rayjob(_queued(make()))
    assert job["metadata"]["labels"][QUEUE_LABEL] == "gpu"
    assert "suspend" not in job["spec"]   # never applied, so never owned: Kueue's writes stand


def test_without_a_queue_the_operator_owns_suspend_and_no_queue_label():
    job = _rayjob(finetune())
    assert job["spec"]["suspend"] is False
    assert QUEUE_LABEL not in job["metadata"]["labels"]


def test_priority_class_reaches_every_ray_pod():
    job = _rayjob(_queued(finetune(), priorityClassName="research-low"))
    cluster = job["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    assert [p["template"]["spec"]["priorityClassName"] for p in pods] == ["research-low"] * len(pods)
    assert "priorityClassName" not in _rayjob(finetune())["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]


def test_suspend_and_a_queue_together_are_refused_naming_both_fields():
    with pytest.raises(ValueError, match=r"spec.suspend .*spec.queueName"):
        FineTuneSpec.model_validate(_queued(finetune(), suspend=True)["spec"])


def _ray(deployment):
    return {"metadata": {"uid": "u1"}, "status": {"jobDeploymentStatus": deployment} if deployment else {}}


WAITING = {"status": {"conditions": [{"type": "QuotaReserved", "status": "False", "reason": "Pending",
                                      "message": "couldn't assign flavors to pod set worker: insufficient unused "
                                                 "quota for nvidia.com/gpu in flavor l4, 4 more needed."}]}}
ADMITTED = {"status": {"conditions": [{"type": "QuotaReserved", "status": "True", "reason": "QuotaReserved"},
                                      {"type": "Admitted", "status": "True", "reason": "Admitted"}]}}


@pytest.mark.parametrize("deployment", ["", "New", "Suspending", "Suspended"])
def test_a_job_kueue_holds_back_is_queued_with_kueues_reason(deployment):
    verdict = queued_verdict("gpu", _ray(deployment), WAITING)
    assert (verdict.phase, verdict.state, verdict.reason) == ("Queued", "progressing", "Queued")
    assert verdict.message == ("waiting in Kueue LocalQueue gpu to be admitted; Pending: couldn't assign flavors "
                               "to pod set worker: insufficient unused quota for nvidia.com/gpu in flavor l4, 4 "
                               "more needed")


def test_before_kueue_made_a_workload_the_message_says_so():
    assert "made no Workload" in queued_verdict("gpu", _ray("Suspended"), None).message


@pytest.mark.parametrize("deployment, workload", [("Running", WAITING), ("Initializing", ADMITTED),
                                                  ("Suspended", ADMITTED), ("Complete", None)])
def test_an_admitted_or_started_job_is_not_queued(deployment, workload):
    assert queued_verdict("gpu", _ray(deployment), workload) is None


def test_no_rayjob_yet_is_not_queued():
    assert queued_verdict("gpu", None, None) is None
