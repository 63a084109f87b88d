"""SIMULATED data plane for the local plane, where no Ray, vLLM or GPU can run.

On the local plane everything up to the Ray pods is real: the operator, the API server, KubeRay (it creates
the RayCluster and the submitter Job), the scheduler and kwok (pods "run" on the simulated L4 nodes). What
cannot happen here is the Ray job itself. This simulator plays exactly that part, and nothing else:

* the payload's report: it patches the job's result ConfigMap **with the job's own ServiceAccount token**
  (from the TokenRequest API), through the real payload reporter (`payloads.report`), so the least-rights
  Role is exercised as in a real pod;
* KubeRay's job-status part: once the job "finishes" it sets the RayJob status the way KubeRay does when
  the Ray dashboard reports the job ended (KubeRay cannot reach a dashboard here).

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

from ..builders.common import OWNER_KIND_LABEL

MANAGED = "app.kubernetes.io/managed-by=llmops"

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
class Simulator:
    kubeconfig: Path
    run_seconds: float = 2.0
    namespace: str | None = None   # None: every namespace
    plans: dict[tuple[str, str], Plan] = field(default_factory=dict)   # (namespace, rayjob) -> plan
    _seen: dict[tuple[str, str], float] = field(default_factory=dict)
    _done: set[tuple[str, str]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.api_client = config.new_client_from_config(str(self.kubeconfig))
        self.core = client.CoreV1Api(self.api_client)
        self.custom = client.CustomObjectsApi(self.api_client)
        self.server = self.api_client.configuration.host
        self.ca = self.api_client.configuration.ssl_ca_cert

    def step(self) -> int:
        """One pass over every llmops RayJob; returns how many jobs it finished."""
        finished = 0
        if self.namespace:
            jobs = self.custom.list_namespaced_custom_object("ray.io", "v1", self.namespace, "rayjobs",
                                                             label_selector=MANAGED)["items"]
        else:
            jobs = self.custom.list_cluster_custom_object("ray.io", "v1", "rayjobs", label_selector=MANAGED)["items"]
        for job in jobs:
            if job["metadata"].get("deletionTimestamp"):
                continue
            key = (job["metadata"]["namespace"], job["metadata"]["name"])
            if key in self._done or job.get("spec", {}).get("suspend"):
                continue
            status = job.get("status") or {}
            if status.get("jobDeploymentStatus") != "Running":
                continue
            first = self._seen.setdefault(key, time.monotonic())
            try:
                if time.monotonic() - first < self.run_seconds:
                    self._report(job, "Running", "simulated: the job is running", progress={"simulatedStep": 1})
                    continue
                self._finish(job, self.plans.get(key, Plan()))
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
        from payloads.report import ResultReporter

        namespace = job["metadata"]["namespace"]
        pod_spec = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
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
                        message: str = "") -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        status = {"jobDeploymentStatus": deployment, "jobStatus": job_status, "endTime": now}
        if reason:
            status.update(reason=reason, message=message)
        self.custom.patch_namespaced_custom_object_status(
            "ray.io", "v1", job["metadata"]["namespace"], "rayjobs", job["metadata"]["name"], {"status": status})


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
