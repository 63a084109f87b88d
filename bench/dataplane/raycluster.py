"""The Ray side of a RayJob or RayService, reproduced on one machine from the objects the operator rendered.

What KubeRay does with a rendered RayJob, done here by hand:

* the pod: every ConfigMap volume of the head container written to its mount path (the job config at
  /etc/llmops/job, the payload sources at /opt/llmops/payloads), emptyDirs created empty, and the container's
  environment (its `env`, the storage secret's keys from `envFrom`, the namespace from the downward API);
* the cluster: `ray start --head` with the group's rayStartParams and the dashboard (one node that holds the GPU:
  the head and the GPU worker group collapse into one machine);
* the submitter: the entrypoint submitted to the dashboard's job API (`ray job submit` does the same) with the
  rendered runtime environment.

Two things differ, both because this machine has no network: the runtime environment's `pip` list is dropped (its
packages were carried and are on PYTHONPATH, as in an image that has them), and the result report goes to a file
(`LLMOPS_RESULT_FILE`) instead of the ConfigMap, as there is no API server.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

DASHBOARD = "http://127.0.0.1:8265"
REPORT_ENV_DROPPED = ("LLMOPS_RESULT_CONFIGMAP",)


def find(objects: list[dict], kind: str, name: str | None = None) -> dict:
    for obj in objects:
        if obj["kind"] == kind and (name is None or obj["metadata"]["name"] == name):
            return obj
    raise KeyError(f"no {kind} {name or ''} in the rendered objects")


def head_container(ray_object: dict) -> tuple[dict, dict]:
    """(pod spec, head container) of a RayJob or RayService."""
    cluster = ray_object["spec"].get("rayClusterSpec") or ray_object["spec"]["rayClusterConfig"]
    pod = cluster["headGroupSpec"]["template"]["spec"]
    return pod, pod["containers"][0]


def materialize_pod(objects: list[dict], ray_object: dict) -> None:
    """Write the head pod's ConfigMap volumes to their mount paths; empty its emptyDirs."""
    pod, container = head_container(ray_object)
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume, path = volumes[mount["name"]], Path(mount["mountPath"])
        if volume.get("emptyDir", {}).get("medium") == "Memory" and path.is_dir():
            continue  # a tmpfs the machine already has (/dev/shm)
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        if "configMap" in volume:
            data = find(objects, "ConfigMap", volume["configMap"]["name"]).get("data") or {}
            for key, text in data.items():
                (path / key).write_text(text)


def pod_environment(ray_object: dict, secrets: dict[str, dict[str, str]], namespace: str = "default"
                    ) -> dict[str, str]:
    """The head container's environment: env (literal, secretKeyRef, the namespace fieldRef) and envFrom."""
    _, container = head_container(ray_object)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(secrets.get(source["secretRef"]["name"], {}))
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "fieldRef" in item.get("valueFrom", {}):
            env[item["name"]] = namespace
        elif "secretKeyRef" in item.get("valueFrom", {}):
            ref = item["valueFrom"]["secretKeyRef"]
            if ref["key"] in secrets.get(ref["name"], {}):
                env[item["name"]] = secrets[ref["name"]][ref["key"]]
    for name in REPORT_ENV_DROPPED:
        env.pop(name, None)
    return env


def runtime_env(ray_job: dict) -> tuple[dict[str, Any], list[str]]:
    """(the RayJob's runtime environment without `pip`, the pip requirements dropped)."""
    text = ray_job["spec"].get("runtimeEnvYAML")
    env = yaml.safe_load(text) if text else {}
    return {k: v for k, v in env.items() if k != "pip"}, list(env.get("pip") or [])


class RayCluster:
    def __init__(self, env: dict[str, str], log_dir: Path, num_gpus: int = 1, resources: str | None = None):
        self.env = env
        self.log_dir = log_dir
        self.num_gpus = num_gpus
        self.resources = resources  # JSON; only for a dry run on a machine whose GPU Ray cannot detect

    def _ray(self, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run(["ray", *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                              check=check)

    def start(self, start_params: dict[str, str]) -> float:
        t0 = time.perf_counter()
        self._ray("stop", "--force", check=False)
        params = {k: v for k, v in start_params.items() if k != "num-gpus"}
        args = [f"--{k}={v}" for k, v in params.items()]
        if self.resources:
            args.append(f"--resources={self.resources}")
        done = self._ray("start", "--head", f"--num-gpus={self.num_gpus}", "--include-dashboard=true",
                         "--dashboard-port=8265", "--disable-usage-stats", *args, check=False)
        (self.log_dir / "ray-start.log").write_text(done.stdout + done.stderr)
        if done.returncode:
            raise RuntimeError(f"ray start failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        self._wait_dashboard()
        return time.perf_counter() - t0

    def _wait_dashboard(self, timeout: float = 120) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{DASHBOARD}/api/version", timeout=2):
                    return
            except OSError:
                time.sleep(1)
        raise RuntimeError("the Ray dashboard did not answer within 120 s")

    def stop(self) -> None:
        self._ray("stop", "--force", check=False, timeout=120)

    def submit(self, submission_id: str, entrypoint: str, runtime_env: dict[str, Any], timeout: float
               ) -> dict[str, Any]:
        """Submit as KubeRay's submitter does and wait; returns status, wall time and the driver's log."""
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(DASHBOARD)
        t0 = time.perf_counter()
        client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id)
        deadline = time.monotonic() + timeout
        status = client.get_job_status(submission_id)
        while not status.is_terminal() and time.monotonic() < deadline:
            time.sleep(2)
            status = client.get_job_status(submission_id)
        wall = time.perf_counter() - t0
        if not status.is_terminal():
            client.stop_job(submission_id)
        logs = client.get_job_logs(submission_id)
        (self.log_dir / f"{submission_id}.log").write_text(logs)
        return {"status": str(status.value if hasattr(status, "value") else status),
                "succeeded": status == JobStatus.SUCCEEDED, "wall_s": round(wall, 1), "log_tail": logs[-4000:]}

    def deploy_serve(self, serve_config_v2: str) -> None:
        """PUT the RayService's serveConfigV2 to the dashboard's Serve REST API, as KubeRay does."""
        import urllib.request

        body = json.dumps(yaml.safe_load(serve_config_v2)).encode()
        request = urllib.request.Request(f"{DASHBOARD}/api/serve/applications/", data=body, method="PUT",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            response.read()

    def serve_status(self) -> dict[str, Any]:
        import urllib.request

        with urllib.request.urlopen(f"{DASHBOARD}/api/serve/applications/", timeout=10) as response:
            return json.loads(response.read())

    def wait_serve_running(self, timeout: float) -> tuple[bool, dict[str, Any]]:
        deadline, status = time.monotonic() + timeout, {}
        while time.monotonic() < deadline:
            try:
                status = self.serve_status()
            except OSError:
                time.sleep(2)
                continue
            apps = status.get("applications") or {}
            states = {name: app.get("status") for name, app in apps.items()}
            if states and all(s == "RUNNING" for s in states.values()):
                return True, status
            if any(s in ("DEPLOY_FAILED", "UNHEALTHY") for s in states.values()):
                return False, status
            time.sleep(3)
        return False, status


def environment_for(pod_env: dict[str, str], sites: list[str], result_file: Path, extra: dict[str, str]
                    ) -> dict[str, str]:
    """This process's environment, the pod's over it, PYTHONPATH = the pod's then the carried packages."""
    env = {**os.environ, **extra, **pod_env}
    env["PYTHONPATH"] = os.pathsep.join([p for p in [pod_env.get("PYTHONPATH"), *sites] if p])
    env["LLMOPS_RESULT_FILE"] = str(result_file)
    return env
