"""Test-side helpers: the operator as a real process, a Kubernetes client, and waiting for conditions."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from gitops import SnapshotContract, gitops_health
from llmops.dev.plane import LocalPlane, free_port

REPO = Path(__file__).resolve().parents[2]
GROUP, VERSION = "llmops.dev", "v1alpha1"
PLURALS = {"FineTune": "finetunes", "BatchInference": "batchinferences", "LLMService": "llmservices"}


@dataclass
class OperatorProcess:
    """`llmops run` as a separate process, as it runs in a pod."""

    plane: LocalPlane
    log_path: Path
    env_extra: dict[str, str] | None = None
    args: tuple[str, ...] = ()
    popen: subprocess.Popen | None = None
    probe_port: int = 0
    metrics_port: int = 0

    def start(self) -> OperatorProcess:
        self.probe_port, self.metrics_port = free_port(), free_port()
        env = {**self.plane.env(), "PYTHONPATH": str(REPO / "operator"), **(self.env_extra or {})}
        log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "llmops.cli", "run", f"--probe-port={self.probe_port}",
             f"--metrics-port={self.metrics_port}", "--log-format=plain", *self.args],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"operator exited with {self.popen.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.probe_port}/healthz", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"operator not healthy after 60s; see {self.log_path}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.popen and self.popen.poll() is None:
            os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class Cluster:
    """A thin client over the kubernetes package for tests. With a `contract`, every status of our kinds it reads
    is checked against docs/gitops.md's table with the real GitOps clients (each distinct one once)."""

    def __init__(self, kubeconfig: Path, contract: SnapshotContract | None = None):
        self.contract = contract
        self.api_client = config.new_client_from_config(str(kubeconfig))
        self.core = client.CoreV1Api(self.api_client)
        self.custom = client.CustomObjectsApi(self.api_client)
        self.rbac = client.RbacAuthorizationV1Api(self.api_client)
        self.auth = client.AuthorizationV1Api(self.api_client)

    def namespace(self, prefix: str = "t") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.core.create_namespace({"metadata": {"name": name}})
        return name

    # our kinds
    def create(self, body: dict[str, Any], namespace: str) -> dict[str, Any]:
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURALS[body["kind"]], body)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        obj = _unless_absent(lambda: self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace,
                                                                              PLURALS[kind], name))
        if obj is not None and self.contract is not None:
            self.contract.check([obj])
        return obj

    def patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return self.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURALS[kind], name, patch)

    def delete(self, kind: str, namespace: str, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURALS[kind], name)

    # KubeRay objects
    def ray(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        return _unless_absent(lambda: self.custom.get_namespaced_custom_object("ray.io", "v1", namespace, plural,
                                                                               name))

    def ray_list(self, plural: str, namespace: str) -> list[dict[str, Any]]:
        return self.custom.list_namespaced_custom_object("ray.io", "v1", namespace, plural)["items"]

    def config_map(self, namespace: str, name: str) -> Any | None:
        return _unless_absent(lambda: self.core.read_namespaced_config_map(name, namespace))

    def pods(self, namespace: str, selector: str = "") -> list[Any]:
        return self.core.list_namespaced_pod(namespace, label_selector=selector).items


def _unless_absent(read: Callable[[], Any]) -> Any | None:
    """What `read` returns, or None where the object does not exist (404)."""
    try:
        return read()
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def wait_for(check: Callable[[], Any], timeout: float = 60, interval: float = 0.25, what: str = "condition",
             show: Callable[[], Any] | None = None) -> Any:
    """Poll until `check()` returns something truthy; fail with the last value seen (and what `show()` returns
    then: say, the resource's status, when the check's value alone would not tell why it waited)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    shown = f"; {show()!r}" if show is not None else ""
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last seen: {last!r}{shown}")


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return c
    return {}


def phase(obj: dict[str, Any] | None) -> str | None:
    return ((obj or {}).get("status") or {}).get("phase")


def stalled_as(cluster: "Cluster", kind: str, namespace: str, name: str, reason: str, timeout: float = 60,
               show: Callable[[], Any] | None = None) -> dict[str, Any]:
    """The resource once it is Stalled with `reason` (failing with its status, or what `show` gives, if it never
    is)."""
    def read() -> dict[str, Any] | None:
        obj = cluster.get(kind, namespace, name)
        return obj if condition(obj, "Stalled").get("reason") == reason else None
    return wait_for(read, timeout=timeout, what=f"{kind} {name} Stalled {reason}",
                    show=show or (lambda: (cluster.get(kind, namespace, name) or {}).get("status")))


@contextlib.contextmanager
def restricted_operator(plane: LocalPlane, cluster: "Cluster", folder: Path, prefix: str) -> Iterator[str]:
    """A namespace that enforces the `restricted` Pod Security level, and an operator for it alone whose settings
    ask for restricted Ray pods (ray_pod_security); yields the namespace, and removes both afterwards."""
    ns = cluster.namespace(prefix)
    cluster.core.patch_namespace(ns, {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}})
    settings = folder / "settings.yaml"
    settings.write_text("ray_pod_security: restricted\n")
    operator = OperatorProcess(plane, folder / "operator.log", args=("-n", ns),
                               env_extra={"LLMOPS_SETTINGS_FILE": str(settings)}).start()
    try:
        yield ns
    finally:
        operator.stop()
        cluster.core.delete_namespace(ns)


class ClientWait:
    """A wait on one resource as a GitOps client does it, in the background: `kubectl get --watch -o json` into
    `gitops-health wait` (kstatus: done at Current, failed at Failed), or a `kubectl wait` command."""

    def __init__(self, plane: LocalPlane, kind: str, namespace: str, name: str, timeout: float = 120,
                 kubectl_wait: str | None = None):
        target = f"{PLURALS[kind]}.{GROUP}/{name}"
        if kubectl_wait:
            self.watch = None
            self.proc = subprocess.Popen([plane.binary("kubectl"), "wait", f"--for={kubectl_wait}", target, "-n",
                                          namespace, f"--timeout={timeout:.0f}s"], env=plane.env(), text=True,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            return
        self.watch = subprocess.Popen([plane.binary("kubectl"), "get", target, "-n", namespace, "-o", "json",
                                       "--watch"], env=plane.env(), stdout=subprocess.PIPE)
        self.proc = subprocess.Popen([str(gitops_health()), "wait", f"--timeout={timeout:.0f}s"],
                                     stdin=self.watch.stdout, text=True, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self.watch.stdout.close()   # the waiter holds the pipe now

    def done(self) -> bool:
        return self.proc.poll() is not None

    def result(self, timeout: float = 10) -> tuple[int, str]:
        """(exit code, what it printed), once it has ended."""
        out, _ = self.proc.communicate(timeout=timeout)
        if self.watch is not None:
            self.watch.kill()
            self.watch.wait()
        return self.proc.returncode, out

    def stop(self) -> None:
        for proc in (self.proc, self.watch):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
