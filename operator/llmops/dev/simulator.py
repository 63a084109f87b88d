"""SIMULATED data plane for the local plane, where no Ray, vLLM or GPU can run.

On the local plane everything up to the Ray pods is real: the operator, the API server, KubeRay (it creates
the RayCluster and the submitter Job), the scheduler and kwok (pods "run" on the simulated L4 nodes). What
cannot happen here is the Ray job itself. This simulator plays exactly that part, and nothing else:

* the payload's report: it patches the job's result ConfigMap **with the job's own ServiceAccount token**
  (from the TokenRequest API), through the real payload reporter (`payloads.report`), so the least-rights
  Role is exercised as in a real pod;
* KubeRay's job-status part: once the job "finishes" it sets the RayJob status the way KubeRay does when
  the Ray dashboard reports the job ended (KubeRay cannot reach a dashboard here);
* a model cache's download: it reports the download Job's progress and completion through the same reporter, as
  the Job's ServiceAccount, and then binds the cache's claim to a volume of its own (the plane has no storage
  provisioner), so the Job's pod is scheduled and kwok completes it like any Job's pod: the Job and its status
  are real, only the bytes are not;
* a lost worker: when a worker pod of a running job goes away (its node deleted, say), the job fails as a Ray
  Train job does when a worker dies, and the status takes KubeRay's retry step (`Retrying` and one more
  `failed` while spec.backoffLimit allows, else `Failed`). KubeRay itself then replaces the cluster, and the
  simulator plays the new attempt like the first.

* KubeRay's RayService-status part: what KubeRay writes once the Ray dashboard reports a Serve application
  (`services`: the application's and its deployments' statuses), and the Ray autoscaler's patch of a RayCluster's
  worker group (`autoscale`), after which KubeRay adds or removes worker pods itself.

Every report it writes says "simulated" in its message, and every metric set it reports carries
`simulated: true`, which the operator copies to `status.metrics.simulated` (a `kubectl get` column).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException
from payloads.report import ReportError

from ..builders.common import MANAGED_BY, MANAGED_SELECTOR, OWNER_KIND_LABEL
from ..builders.sizing import BYTES_PER_PARAM, model_params_b


# Figures the simulator reports by default: only those the reference run printed (its training run's
# all_results.json; exact match 745/1083 over ViGGO's test split). The reference computed no other metric.
SIMULATED_TRAIN_METRICS = {"trainLoss": 0.2079, "evalLoss": 0.1362, "trainRuntimeSeconds": 437.3,
                           "trainSamplesPerSecond": 11.434}
SIMULATED_EVAL_METRICS = {"rows": 1083, "exactMatch": 0.688}


@dataclass
class Plan:
    """What the simulated job does: succeed (default) or fail with a message."""

    outcome: str = "Succeeded"
    message: str = ""
    metrics: dict[str, Any] | None = None


@dataclass
class ServeApp:
    """What the simulated Ray dashboard reports for a RayService's Serve application."""

    deployments: dict[str, str]
    """Serve deployment name -> its status (HEALTHY, UPSCALING, DOWNSCALING, UNHEALTHY, ...)."""
    status: str = "RUNNING"
    name: str = "llm"


@dataclass
class Simulator:
    kubeconfig: Path
    run_seconds: float = 2.0
    notice_seconds: float = 5.0   # how long a Ray job takes to fail after a worker is lost (heartbeats missed)
    namespace: str | None = None   # None: every namespace
    plans: dict[tuple[str, str], Plan] = field(default_factory=dict)   # (namespace, rayjob) -> plan
    only: set[str] | None = None   # the RayJobs (names) it may finish; None: every one
    _seen: dict[tuple[str, str, int], float] = field(default_factory=dict)   # (namespace, rayjob, attempt)
    _done: set[tuple[str, str, int]] = field(default_factory=set)
    _workers: dict[tuple[str, str, int], set[str]] = field(default_factory=dict)   # worker pod uids per attempt
    _lost: dict[tuple[str, str, int], float] = field(default_factory=dict)   # when a worker was first missed
    _running_workers: dict[tuple[str, str], set[str]] | None = None
    services: dict[tuple[str, str], ServeApp] = field(default_factory=dict)   # (namespace, rayservice) -> app
    downloads: dict[tuple[str, str], Plan] = field(default_factory=dict)   # (namespace, Job) -> plan
    _downloading: set[tuple[str, str]] = field(default_factory=set)
    _downloaded: set[tuple[str, str]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.api_client = config.new_client_from_config(str(self.kubeconfig))
        self.core = client.CoreV1Api(self.api_client)
        self.batch = client.BatchV1Api(self.api_client)
        self.custom = client.CustomObjectsApi(self.api_client)
        self.server = self.api_client.configuration.host
        self.ca = self.api_client.configuration.ssl_ca_cert

    def step(self) -> int:
        """One pass over every llmops RayJob and model download (and the RayServices in `services`); returns how
        many it finished."""
        for (namespace, name), app in list(self.services.items()):
            self._serve(namespace, name, app)
        finished = self._play_downloads()
        if self.namespace:
            jobs = self.custom.list_namespaced_custom_object("ray.io", "v1", self.namespace, "rayjobs",
                                                             label_selector=MANAGED_SELECTOR)["items"]
        else:
            jobs = self.custom.list_cluster_custom_object("ray.io", "v1", "rayjobs",
                                                          label_selector=MANAGED_SELECTOR)["items"]
        self._running_workers = None   # listed once per pass, when a running job first needs them
        for job in jobs:
            if job["metadata"].get("deletionTimestamp"):
                continue
            status = job.get("status") or {}
            attempt = int(status.get("failed") or 0)
            key = (job["metadata"]["namespace"], job["metadata"]["name"], attempt)
            if key in self._done or job.get("spec", {}).get("suspend"):
                continue
            if self.only is not None and key[1] not in self.only:
                continue
            if status.get("jobDeploymentStatus") != "Running":
                continue
            first = self._seen.setdefault(key, time.monotonic())
            try:
                if self._lost_worker(job, key):
                    self._fail_attempt(job, attempt)
                elif key in self._lost or time.monotonic() - first < self.run_seconds:
                    self._report(job, "Running", f"simulated: attempt {attempt + 1} of the job is running",
                                 progress={"simulatedStep": 1})
                    continue
                else:
                    self._finish(job, self.plans.get(key[:2], Plan()))
            except (ApiException, ReportError) as e:  # e.g. its namespace is being deleted: leave the job alone
                print(f"[simulator] {key[0]}/{key[1]}: {e}", flush=True)
                continue
            self._done.add(key)
            finished += 1
        return finished

    def run(self, until: float | None = None, interval: float = 0.5) -> None:
        while until is None or time.monotonic() < until:
            try:
                self.step()
            except ApiException as e:  # the plane may be restarting; the next pass retries
                print(f"[simulator] API error: {e.status} {e.reason}", flush=True)
            time.sleep(interval)

    # ---- a model cache's download ----------------------------------------------------------------------
    def _play_downloads(self) -> int:
        """First pass over a download Job: a Running report with half the bytes; the next one: the whole model
        reported (or the plan's failure), then its claim bound, so the Job's pod runs and completes."""
        jobs = (self.batch.list_namespaced_job(self.namespace, label_selector=MANAGED_SELECTOR) if self.namespace
                else self.batch.list_job_for_all_namespaces(label_selector=MANAGED_SELECTOR)).items
        finished = 0
        for job in jobs:
            key = (job.metadata.namespace, job.metadata.name)
            if key in self._downloaded or job.metadata.deletion_timestamp:
                continue
            pod = self.api_client.sanitize_for_serialization(job.spec.template.spec)
            args = pod["containers"][0].get("command") or []
            if "payloads.model_download" not in args:
                continue
            source = args[args.index("--source") + 1] if "--source" in args else ""
            total = int(model_params_b(source) * 1e9 * BYTES_PER_PARAM)
            try:
                if key not in self._downloading:
                    self._report_as(pod, key[0], "Running", f"simulated: downloading {source}",
                                    progress={"bytesDone": total // 2, "bytesTotal": total, "files": 4})
                    self._downloading.add(key)
                    continue
                plan = self.downloads.get(key, Plan())
                if plan.outcome != "Succeeded":
                    self._report_as(pod, key[0], "Failed", plan.message or "simulated: the download failed")
                else:
                    self._report_as(pod, key[0], "Succeeded", f"simulated: {source} is cached",
                                    progress={"bytesDone": total, "bytesTotal": total, "files": 4})
                    claim = next(v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                                 if "persistentVolumeClaim" in v)
                    self._bind(key[0], claim)
            except (ApiException, ReportError) as e:
                print(f"[simulator] {key[0]}/{key[1]}: {e}", flush=True)
                continue
            self._downloaded.add(key)
            finished += 1
        return finished

    def _bind(self, namespace: str, claim: str) -> None:
        """A volume for the claim, bound to it up front (what a storage provisioner would make)."""
        pvc = self.core.read_namespaced_persistent_volume_claim(claim, namespace)
        self.core.create_persistent_volume({
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": f"llmops-sim-{pvc.metadata.uid}", "labels": dict(MANAGED_BY)},
            "spec": {"capacity": {"storage": pvc.spec.resources.requests["storage"]},
                     "accessModes": list(pvc.spec.access_modes), "persistentVolumeReclaimPolicy": "Retain",
                     "storageClassName": pvc.spec.storage_class_name or "",
                     "hostPath": {"path": f"/var/lib/llmops-sim/{namespace}/{claim}"},
                     "claimRef": {"namespace": namespace, "name": claim, "uid": pvc.metadata.uid}}})

    # ---- a worker lost with its node -----------------------------------------------------------------------
    def _lost_worker(self, job: dict[str, Any], key: tuple[str, str, int]) -> bool:
        """True `notice_seconds` after a worker pod that this attempt ran on went (as Ray Train notices a dead
        worker once its node has missed its heartbeats)."""
        cluster = (job.get("status") or {}).get("rayClusterName")
        if not cluster:
            return False
        live = self._live_workers().get((key[0], cluster), set())
        known = self._workers.setdefault(key, set())
        if known - live:
            self._lost.setdefault(key, time.monotonic())
        known |= live
        return key in self._lost and time.monotonic() - self._lost[key] >= self.notice_seconds

    def _live_workers(self) -> dict[tuple[str, str], set[str]]:
        """(namespace, RayCluster) -> uids of its Running worker pods that are not being deleted: one list a pass."""
        if self._running_workers is None:
            selector = "ray.io/node-type=worker"
            pods = (self.core.list_namespaced_pod(self.namespace, label_selector=selector) if self.namespace
                    else self.core.list_pod_for_all_namespaces(label_selector=selector)).items
            self._running_workers = {}
            for p in pods:
                if not p.metadata.deletion_timestamp and p.status.phase == "Running":
                    key = (p.metadata.namespace, (p.metadata.labels or {}).get("ray.io/cluster", ""))
                    self._running_workers.setdefault(key, set()).add(p.metadata.uid)
        return self._running_workers

    def _fail_attempt(self, job: dict[str, Any], attempt: int) -> None:
        """The driver's Failed report, then KubeRay's step for a failed Ray job: a retry while the limit allows."""
        self._report(job, "Failed", "simulated: a Ray Train worker died with its node (ActorDiedError)")
        failed = attempt + 1
        retry = failed <= int(job["spec"].get("backoffLimit") or 0)
        self._set_job_status(job, "Retrying" if retry else "Failed", "FAILED", reason="AppFailed",
                             message="simulated: a Ray Train worker died with its node", failed=failed)

    # ---- the payload's part -------------------------------------------------------------------------------
    def _finish(self, job: dict[str, Any], plan: Plan) -> None:
        owner_kind = job["metadata"].get("labels", {}).get(OWNER_KIND_LABEL, "")
        if plan.outcome == "Succeeded":
            fields: dict[str, Any] = {}
            if owner_kind == "FineTune":
                spec = self._job_spec(job)
                fields["adapter"] = {"uri": spec["output"]["uri"], "baseModel": spec["baseModel"]["source"],
                                     "rank": spec.get("method", {}).get("rank", 8)}
                fields["metrics"] = {**(plan.metrics or SIMULATED_TRAIN_METRICS), "simulated": True}
            else:
                spec = self._job_spec(job)
                fields["metrics"] = {**(plan.metrics or SIMULATED_EVAL_METRICS), "simulated": True}
                fields["outputURI"] = spec["output"]["uri"]
            self._report(job, "Succeeded", plan.message or "simulated: the job finished", **fields)
            self._set_job_status(job, "Complete", "SUCCEEDED")
        else:
            self._report(job, "Failed", plan.message or "simulated: the job failed")
            self._set_job_status(job, "Failed", "FAILED", reason="AppFailed",
                                 message=plan.message or "simulated failure")

    def _job_spec(self, job: dict[str, Any]) -> dict[str, Any]:
        volumes = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"]
        config_map = next(v["configMap"]["name"] for v in volumes if v["name"] == "llmops-job")
        cm = self.core.read_namespaced_config_map(config_map, job["metadata"]["namespace"])
        return json.loads(cm.data["job.json"])

    def _report(self, job: dict[str, Any], state: str, message: str, **fields: Any) -> None:
        """Send the report through the real payload reporter, authenticated as the job's ServiceAccount."""
        self._report_as(job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"],
                        job["metadata"]["namespace"], state, message, **fields)

    def _report_as(self, pod_spec: dict[str, Any], namespace: str, state: str, message: str, **fields: Any) -> None:
        """Report as the pod would: to the ConfigMap its environment names, with its ServiceAccount's token."""
        from payloads.report import ResultReporter

        account = pod_spec["serviceAccountName"]
        result_cm = next(e["value"] for e in pod_spec["containers"][0]["env"] if e["name"] == "LLMOPS_RESULT_CONFIGMAP")
        token = self.core.create_namespaced_service_account_token(
            account, namespace, {"spec": {"expirationSeconds": 600}}).status.token
        with tempfile.NamedTemporaryFile("w", delete=False) as f:
            f.write(token)
        try:
            reporter = ResultReporter.from_env(env={}, configmap=result_cm, namespace=namespace,
                                               api_url=self.server, token_path=f.name, ca_path=self.ca)
            reporter.report(state=state, message=message, **fields)
        finally:
            os.unlink(f.name)

    # ---- KubeRay's job-status part ----------------------------------------------------------------------
    def _set_job_status(self, job: dict[str, Any], deployment: str, job_status: str, reason: str = "",
                        message: str = "", **counts: int) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        status: dict[str, Any] = {"jobDeploymentStatus": deployment, "jobStatus": job_status, "endTime": now,
                                  **counts}
        if reason:
            status.update(reason=reason, message=message)
        self.custom.patch_namespaced_custom_object_status(
            "ray.io", "v1", job["metadata"]["namespace"], "rayjobs", job["metadata"]["name"], {"status": status})


    # ---- KubeRay's RayService-status part, and the Ray autoscaler's ---------------------------------------
    def _serve(self, namespace: str, name: str, app: ServeApp) -> None:
        """The status KubeRay writes for a RayService whose cluster's dashboard reports `app`: the cluster
        promoted to active, Ready with the head's proxy as its serve endpoint. Written once the head pod is
        ready, since KubeRay then stops writing (it cannot reach the dashboard here), and again whenever it
        differs."""
        try:
            service = self.custom.get_namespaced_custom_object("ray.io", "v1", namespace, "rayservices", name)
        except ApiException as e:
            if e.status == 404:
                return
            raise
        status = service.get("status") or {}
        cluster_name = ((status.get("activeServiceStatus") or {}).get("rayClusterName")
                        or (status.get("pendingServiceStatus") or {}).get("rayClusterName"))
        if not cluster_name:
            return
        ray_cluster = self.custom.get_namespaced_custom_object("ray.io", "v1", namespace, "rayclusters", cluster_name)
        cluster_status = ray_cluster.get("status") or {}
        if not any(c.get("type") == "HeadPodReady" and c.get("status") == "True"
                   for c in cluster_status.get("conditions") or []):
            return
        applications = {app.name: {"status": app.status, "serveDeploymentStatuses": {
            deployment: {"status": state} for deployment, state in app.deployments.items()}}}
        active = status.get("activeServiceStatus") or {}
        if (active.get("rayClusterName") == cluster_name and active.get("applicationStatuses") == applications
                and not (status.get("pendingServiceStatus") or {}).get("rayClusterName")):
            return
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.custom.patch_namespaced_custom_object_status("ray.io", "v1", namespace, "rayservices", name, {"status": {
            "observedGeneration": service["metadata"].get("generation"),
            "serviceStatus": "Running",
            "numServeEndpoints": 1,
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "NonZeroServeEndpoints", "lastTransitionTime": now,
                 "message": "simulated: Number of serve endpoints is greater than 0"},
                {"type": "UpgradeInProgress", "status": "False", "reason": "NoPendingCluster",
                 "lastTransitionTime": now, "message": "simulated: Active Ray cluster exists and no pending Ray cluster"},
            ],
            "activeServiceStatus": {"rayClusterName": cluster_name, "applicationStatuses": applications,
                                    "rayClusterStatus": cluster_status},
            "pendingServiceStatus": None,
        }})

    def autoscale(self, namespace: str, cluster: str, replicas: int, delete: list[str] | None = None) -> None:
        """The Ray autoscaler's request to KubeRay: the worker group's replicas, and which pods to remove (KubeRay
        removes only those it is told to while in-tree autoscaling is on)."""
        patch = [{"op": "replace", "path": "/spec/workerGroupSpecs/0/replicas", "value": replicas}]
        if delete is not None:
            patch.append({"op": "add", "path": "/spec/workerGroupSpecs/0/scaleStrategy",
                          "value": {"workersToDelete": list(delete)}})
        self.custom.patch_namespaced_custom_object("ray.io", "v1", namespace, "rayclusters", cluster, patch,
                                                   _content_type="application/json-patch+json")


def main(argv: list[str] | None = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(description="SIMULATED Ray data plane for the local control plane")
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    parser.add_argument("--run-seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    print("[simulator] SIMULATED data plane: it stands in for the Ray jobs and their payloads", flush=True)
    Simulator(Path(args.kubeconfig), run_seconds=args.run_seconds).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
