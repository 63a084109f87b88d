"""Operator core on the real plane: metrics, zero writes at rest, restarts without rewrites."""

from __future__ import annotations

import contextlib
import json
import re

import pytest

from integration.harness import OperatorProcess, condition, phase, stalled_as, wait_for
from manifests import batchinference, finetune
from reliability.support import eventually_quiet

pytestmark = pytest.mark.integration


def _counter(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_endpoint(cluster, operator, ns):
    cluster.create(finetune("metered"), ns)
    wait_for(lambda: phase(cluster.get("FineTune", ns, "metered")) == "Running", timeout=90, what="Running")
    text = operator.metrics()
    for name in ("llmops_reconciles_total", "llmops_reconcile_duration_seconds_bucket", "llmops_resources",
                 "llmops_api_requests_total"):
        assert name in text, name
    assert _counter(text, "llmops_reconciles_total", kind="FineTune", result="ok") >= 1
    assert re.search(r'llmops_resources\{kind="FineTune",phase="Running"\} [1-9]', text)


def test_restart_converges_without_rewriting(plane, cluster, ns, tmp_path, alone):
    """With the shared operator paused: otherwise it would do the writes the restarted one must not need."""
    def versions() -> dict[str, str]:
        return {k: cluster.get(k, ns, n)["metadata"]["resourceVersion"]
                for k, n in (("FineTune", "steady"), ("BatchInference", "waiting"))}

    first = OperatorProcess(plane, tmp_path / "first.log", args=("-n", ns)).start()
    try:
        cluster.create(finetune("steady"), ns)
        cluster.create(batchinference("waiting", fine_tune="missing"), ns)
        wait_for(lambda: phase(cluster.get("FineTune", ns, "steady")) == "Running", timeout=90, what="Running")
        wait_for(lambda: (cluster.get("BatchInference", ns, "waiting").get("status") or {}).get("phase"),
                 what="the BatchInference status")
        # settled: the first operator's last status writes are in, nothing moves for a second
        quiet, moved = eventually_quiet(lambda: {**versions(), "writes": _counter(first.metrics(),
                                                                                 "llmops_api_requests_total")},
                                        seconds=1.0, timeout=30)
        assert quiet, f"the first operator never settled: {moved}"
        settled = versions()
    finally:
        first.kill()
    second = OperatorProcess(plane, tmp_path / "second.log", args=("-n", ns)).start()
    try:
        def reconciled_both() -> str | None:  # counted once the reconcile's writes, if any, are done
            text = second.metrics()
            return text if all(_counter(text, "llmops_reconciles_total", kind=k) >= 1
                               for k in ("FineTune", "BatchInference")) else None

        text = wait_for(reconciled_both, timeout=30, what="the restarted operator to reconcile both resources")
        # A reconcile that finds nothing to change sends nothing: no applies, no status writes.
        assert _counter(text, "llmops_api_requests_total", verb="PATCH") == 0, text
        assert _counter(text, "llmops_api_requests_total", verb="POST") == 0, text
        assert versions() == settled
        assert len(cluster.ray_list("rayjobs", ns)) == 1
    finally:
        second.stop()


def test_rayjob_deleted_while_the_operator_is_down(cluster, operator, ns):
    """The restarted operator lists no RayJob for a FineTune that had one: the run failed (RayJobDeleted), and
    nothing re-creates the RayJob."""
    cluster.create(finetune("orphaned"), ns)
    wait_for(lambda: phase(cluster.get("FineTune", ns, "orphaned")) == "Running", timeout=90, what="Running")
    operator.kill()
    try:
        cluster.custom.delete_namespaced_custom_object("ray.io", "v1", ns, "rayjobs", "orphaned-ft")
        wait_for(lambda: cluster.ray("rayjobs", ns, "orphaned-ft") is None, timeout=60, what="the RayJob to go")
        assert phase(cluster.get("FineTune", ns, "orphaned")) == "Running"
    finally:
        operator.start()
    ft = wait_for(lambda: (lambda o: o if phase(o) == "Failed" else None)(cluster.get("FineTune", ns, "orphaned")),
                  timeout=60, what="Failed")
    assert condition(ft, "Stalled")["reason"] == "RayJobDeleted"
    # Another reconcile of the failed FineTune (an annotation is a change) must not bring the RayJob back either.
    done = _counter(operator.metrics(), "llmops_reconciles_total", kind="FineTune")
    cluster.patch("FineTune", ns, "orphaned", {"metadata": {"annotations": {"touched": "1"}}})
    wait_for(lambda: _counter(operator.metrics(), "llmops_reconciles_total", kind="FineTune") > done,
             timeout=30, what="a reconcile of the touched FineTune")
    assert cluster.ray("rayjobs", ns, "orphaned-ft") is None
    assert phase(cluster.get("FineTune", ns, "orphaned")) == "Failed"


@contextlib.contextmanager
def crd_without(plane, crd: str, path: str, probe: dict):
    """The CRD `crd` without the schema property at `path` ("spec.backoffLimit"), as an older version of it has,
    until the block ends; `probe`, an object setting that field, is what the API server refuses once it has taken
    the changed schema (a moment after the CRD changes)."""
    def read() -> dict:
        return json.loads(plane.kubectl("get", "crd", crd, "-o", "json", quiet=True).stdout)

    def refused() -> bool:
        applied = plane.kubectl("apply", "--server-side", "--dry-run=server", "-f", "-", input=json.dumps(probe),
                                check=False, quiet=True)
        return "field not declared in schema" in applied.stderr

    original, older = read(), read()
    section, field = path.split(".")
    dropped = [version["schema"]["openAPIV3Schema"]["properties"][section]["properties"].pop(field, None)
               for version in older["spec"]["versions"]]   # older versions of the CRD may lack it already
    assert any(dropped), f"{crd} has no {path} to drop"
    plane.kubectl("replace", "-f", "-", input=json.dumps(older), quiet=True)
    try:
        wait_for(refused, timeout=30, what=f"the API server to take {crd} without {path}")
        yield
    finally:
        original["metadata"]["resourceVersion"] = read()["metadata"]["resourceVersion"]
        plane.kubectl("replace", "-f", "-", input=json.dumps(original), quiet=True)


def test_a_crd_older_than_the_operator_stalls_naming_the_field_then_recovers(plane, cluster, operator, ns):
    """KubeRay's RayJob CRD without a field the operator writes (an older KubeRay; CRDs a Helm upgrade left as they
    were): the API server fails every apply of it. The FineTune says so, Stalled with the field and the fix (it was
    retried in silence, Pending for ever), and goes on once the CRD has the field again."""
    probe = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "probe", "namespace": ns},
             "spec": {"entrypoint": "true", "backoffLimit": 0}}
    with crd_without(plane, "rayjobs.ray.io", "spec.backoffLimit", probe):
        cluster.create(finetune("older-kuberay"), ns)
        stalled = stalled_as(cluster, "FineTune", ns, "older-kuberay", "CRDOutdated")
        message = condition(stalled, "Stalled")["message"]
        assert "ray.io/v1 RayJob" in message and ".spec.backoffLimit" in message and "KubeRay" in message, message
        assert phase(stalled) == "Pending" and condition(stalled, "Ready")["status"] == "False"
        assert cluster.ray_list("rayjobs", ns) == []
    # Any change to the resource tries again at once (else the back-off's next retry, within minutes).
    cluster.patch("FineTune", ns, "older-kuberay", {"metadata": {"annotations": {"retry": "now"}}})
    wait_for(lambda: cluster.ray_list("rayjobs", ns), timeout=60, what="the RayJob")
    wait_for(lambda: condition(cluster.get("FineTune", ns, "older-kuberay"), "Stalled").get("status") == "False",
             timeout=60, what="Stalled=False")


def test_a_quota_that_refuses_the_rayjob_stalls_then_passes_once_raised(plane, cluster, operator, ns):
    """A namespace's object-count quota refuses the RayJob: Stalled, QuotaExceeded, quoting the quota (it was Failed,
    ApplyFailed, and never tried again); raising the quota lets the FineTune go on with no change to it."""
    def quota(jobs: int) -> None:
        body = {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "jobs", "namespace": ns},
                "spec": {"hard": {"count/rayjobs.ray.io": str(jobs)}}}
        plane.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(body), quiet=True)

    def counted() -> bool:
        """The quota controller counts a CRD's objects only once its periodic discovery has found the CRD, and
        counts a quota made before that only at its next full resync (minutes): made again until counted."""
        used = plane.kubectl("get", "resourcequota", "jobs", "-n", ns, "-o", "jsonpath={.status.used}",
                             check=False, quiet=True).stdout
        if "rayjobs" not in used:
            plane.kubectl("delete", "resourcequota", "jobs", "-n", ns, "--ignore-not-found", quiet=True)
            quota(0)
        return "rayjobs" in used

    quota(0)
    wait_for(counted, timeout=120, interval=5, what="the quota controller to count RayJobs")
    cluster.create(finetune("over-quota"), ns)
    stalled = stalled_as(cluster, "FineTune", ns, "over-quota", "QuotaExceeded")
    assert phase(stalled) == "Pending" and "exceeded quota: jobs" in condition(stalled, "Stalled")["message"]
    quota(1)
    wait_for(lambda: cluster.ray_list("rayjobs", ns), timeout=90, what="the RayJob, once the quota allows it")
    wait_for(lambda: condition(cluster.get("FineTune", ns, "over-quota"), "Stalled").get("status") == "False",
             timeout=60, what="Stalled=False")


def test_a_failing_webhook_is_said_in_the_status_and_passed_once_it_is_gone(plane, cluster, operator, ns):
    """An admission webhook whose service is down (failurePolicy Fail) fails every RayJob write with a 500: the
    operator retries as before, and the FineTune, not started yet, says why instead of showing nothing."""
    webhook = {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
               "metadata": {"name": f"down-{ns}"},
               "webhooks": [{"name": "policy.example.com", "failurePolicy": "Fail", "sideEffects": "None",
                             "admissionReviewVersions": ["v1"], "timeoutSeconds": 1,
                             "clientConfig": {"service": {"name": "nowhere", "namespace": ns}},
                             "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
                             "rules": [{"apiGroups": ["ray.io"], "apiVersions": ["v1"], "resources": ["rayjobs"],
                                        "operations": ["CREATE", "UPDATE"]}]}]}
    plane.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(webhook), quiet=True)
    try:
        cluster.create(finetune("behind-webhook"), ns)
        retrying = wait_for(lambda: (lambda o: o if condition(o, "Reconciling").get("reason") == "RetryingAfterErrors"
                                     else None)(cluster.get("FineTune", ns, "behind-webhook")), timeout=60,
                            what="Reconciling RetryingAfterErrors")
        assert 'failed calling webhook "policy.example.com"' in condition(retrying, "Reconciling")["message"]
        assert condition(retrying, "Stalled")["status"] == "False" and cluster.ray_list("rayjobs", ns) == []
    finally:
        plane.kubectl("delete", "validatingwebhookconfiguration", f"down-{ns}", quiet=True)
    wait_for(lambda: cluster.ray_list("rayjobs", ns), timeout=120, what="the RayJob, once the webhook is gone")
    wait_for(lambda: condition(cluster.get("FineTune", ns, "behind-webhook"), "Reconciling").get("reason")
             != "RetryingAfterErrors", timeout=60, what="a status past the errors")


def test_an_operator_newer_than_its_own_crd_says_which_field_then_recovers(plane, cluster, operator, ns):
    """The FineTune CRD without a status field the operator writes (a Helm upgrade leaves CRDs as they were): the
    FineTune says so, with the field and the fix, and goes on once the CRD has it again."""
    probe = {**finetune("probe"), "status": {"rayJobName": "x"}}
    probe["metadata"]["namespace"] = ns
    with crd_without(plane, "finetunes.llmops.dev", "status.rayJobName", probe):
        cluster.create(finetune("older-crd"), ns)
        stalled = stalled_as(cluster, "FineTune", ns, "older-crd", "CRDOutdated")
        message = condition(stalled, "Stalled")["message"]
        assert ".status.rayJobName" in message and "apply the CRDs of this operator's version" in message, message
    cluster.patch("FineTune", ns, "older-crd", {"metadata": {"annotations": {"retry": "now"}}})
    done = wait_for(lambda: (lambda o: o if (o.get("status") or {}).get("rayJobName") else None)(
        cluster.get("FineTune", ns, "older-crd")), timeout=60, what="status.rayJobName")
    assert condition(done, "Stalled")["status"] == "False"


def test_workers_a_gpu_quota_refuses_are_said_in_the_status_then_run_once_raised(plane, cluster, operator, ns):
    """A quota of no GPUs: KubeRay creates the head (it asks for none) but not the workers, so the job is short of
    pods rather than without any: Stalled, PodsRefused, quoting the quota; raised, the workers come and the job
    runs, with no change to the FineTune."""
    def quota(gpus: int) -> None:
        body = {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "gpus", "namespace": ns},
                "spec": {"hard": {"requests.nvidia.com/gpu": str(gpus)}}}
        plane.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(body), quiet=True)

    quota(0)
    wait_for(lambda: plane.kubectl("get", "resourcequota", "gpus", "-n", ns, "-o", "jsonpath={.status.hard}",
                                   quiet=True).stdout, what="the quota counted")
    cluster.create(finetune("no-gpus"), ns)
    refused = stalled_as(cluster, "FineTune", ns, "no-gpus", "PodsRefused", timeout=150)
    message = condition(refused, "Stalled")["message"]
    assert "exceeded quota: gpus" in message, message
    pods = cluster.core.list_namespaced_pod(ns, label_selector="ray.io/node-type").items
    assert [p.metadata.labels["ray.io/node-type"] for p in pods] == ["head"], [p.metadata.name for p in pods]
    quota(2)
    wait_for(lambda: phase(cluster.get("FineTune", ns, "no-gpus")) == "Running", timeout=120,
             what="the FineTune Running once the quota allows its workers")
    assert condition(cluster.get("FineTune", ns, "no-gpus"), "Stalled")["status"] == "False"


def test_ray_pods_that_kubernetes_refuses_are_said_in_the_status(cluster, operator):
    """A namespace whose Pod Security level is `restricted` refuses the Ray pods (they need `baseline`): KubeRay
    creates no pod and keeps trying, so nothing the operator watches changes. Once the pods are late it reads
    KubeRay's reason from the RayCluster: Stalled, PodsRefused, quoting it (before: RayClusterStarting for ever)."""
    ns = cluster.namespace("restricted")
    cluster.core.patch_namespace(ns, {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}})
    try:
        cluster.create(finetune("refused-pods"), ns)
        refused = stalled_as(cluster, "FineTune", ns, "refused-pods", "PodsRefused", timeout=150)
        message = condition(refused, "Stalled")["message"]
        assert "KubeRay cannot create the pods of Ray cluster" in message and "PodSecurity" in message, message
        assert phase(refused) == "Pending"
    finally:
        cluster.core.delete_namespace(ns)
