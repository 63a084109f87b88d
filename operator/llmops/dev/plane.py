"""A real local control plane: etcd, kube-apiserver, controller-manager, scheduler, kwok, KubeRay and, when
asked, Kueue.

Everything listens on loopback with free ports; data, credentials and logs live in one folder. Binaries come
from ``tools/controlplane/build.py`` (``$LLMOPS_CACHE/bin``). The same class serves ``llmops dev up`` and the
pytest session fixture.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import nodes
from .processes import PlaneError, Process, alive, bin_dir, cache_dir, free_port, http_ok, log, terminate

__all__ = ["BUILD_HINT", "LocalPlane", "PlaneError", "Process", "bin_dir", "cache_dir", "free_port", "log"]

REPO = Path(__file__).resolve().parents[3]
BUILD_SCRIPT = REPO / "tools" / "controlplane" / "build.py"
BUILD_HINT = f"{sys.executable} {BUILD_SCRIPT.relative_to(REPO) if BUILD_SCRIPT.exists() else BUILD_SCRIPT}"
SERVICE_CIDR = "10.96.0.0/16"
GATEWAY_API_CRDS = ("gatewayclasses.gateway.networking.k8s.io", "gateways.gateway.networking.k8s.io",
                    "httproutes.gateway.networking.k8s.io")
ENVOY_GATEWAY_CRDS = ("securitypolicies.gateway.envoyproxy.io",)
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "kwok",
            "ray-operator")
KUEUE_NAMESPACE = "kueue-system"
# Kueue's manager reads its metrics certificate from this fixed path whenever its own certificate management is
# off (it is: that needs in-cluster Services, which a plane without kube-proxy cannot reach).
KUEUE_METRICS_CERTS = Path("/etc/kueue/metrics/certs")


@dataclass
class LocalPlane:
    """One local control plane rooted at `root` (created if missing)."""

    root: Path
    pools: tuple[nodes.Pool, ...] = nodes.DEFAULT_POOLS
    with_kueue: bool = False   # also run Kueue, managing RayJobs that name a queue
    processes: list[Process] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)

    # ---- paths -------------------------------------------------------------------------------------------
    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def binary(self, name: str) -> str:
        path = bin_dir() / name
        if not path.exists():
            raise PlaneError(f"{path} is missing: build the control plane first with `{BUILD_HINT}`")
        return str(path)

    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig),
                "PATH": f"{bin_dir()}{os.pathsep}{os.environ.get('PATH', '')}"}

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def start(self, with_kuberay: bool = True) -> None:
        missing = [b for b in BINARIES if not (bin_dir() / b).exists()]
        if missing:
            raise PlaneError(f"missing binaries {', '.join(missing)} in {bin_dir()}: run `{BUILD_HINT}`")
        self.root.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        try:
            self._credentials()
            self._start_etcd()
            self._start_apiserver()
            self._start_controllers()
            self._start_kwok()
            nodes.register_pools(self, self.pools)
            self.install_kuberay_crds()
            self.install_gateway_api()
            if with_kuberay:
                self.start_kuberay()
            if self.with_kueue:
                self.start_kueue()
            self._wait_default_service_account()
        except Exception:
            self.print_logs_hint()
            self.stop()
            raise
        self.save_state()

    def stop(self) -> None:
        """End only the processes this plane started, newest first."""
        for proc in reversed(self.processes):
            terminate(proc.pid)
        self.processes = []
        if self.state_file.exists():
            self.state_file.unlink()

    def save_state(self) -> None:
        self.state_file.write_text(json.dumps({
            "processes": [p.__dict__ for p in self.processes], "ports": self.ports}, indent=2))

    @classmethod
    def load(cls, root: Path) -> LocalPlane:
        plane = cls(root)
        state = json.loads(plane.state_file.read_text())
        plane.processes = [Process(**p) for p in state["processes"]]
        plane.ports = state["ports"]
        return plane

    def status(self) -> dict[str, bool]:
        return {p.name: alive(p.pid) for p in self.processes}

    def print_logs_hint(self) -> None:
        log(f"component logs are in {self.logs}:")
        for f in sorted(self.logs.glob("*.log")):
            if f.name == "audit.log":
                continue
            tail = f.read_text(errors="replace").splitlines()[-5:]
            log(f"--- {f.name} (last lines)\n" + "\n".join(tail))

    # ---- components --------------------------------------------------------------------------------------
    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Process:
        log_path = self.logs / f"{name}.log"
        with open(log_path, "ab") as out:
            popen = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env or self.env(), start_new_session=True, cwd=self.root)
        proc = Process(name, popen.pid, str(log_path))
        self.processes.append(proc)
        return proc

    def _credentials(self) -> None:
        pki = self.root / "pki"
        pki.mkdir(exist_ok=True)
        if not (pki / "sa.key").exists():
            subprocess.run(["openssl", "genrsa", "-out", str(pki / "sa.key"), "2048"], check=True,
                           capture_output=True)
            subprocess.run(["openssl", "rsa", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub")],
                           check=True, capture_output=True)
        tokens = pki / "tokens.csv"
        if not tokens.exists():
            token = secrets.token_hex(24)
            tokens.write_text(f'{token},admin,admin,"system:masters"\n')
        self.admin_token = tokens.read_text().split(",", 1)[0]

    def _start_etcd(self) -> None:
        client, peer = free_port(), free_port()
        self.ports["etcd"] = client
        self.spawn("etcd", [
            self.binary("etcd"), "--name", "default", "--data-dir", str(self.root / "etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{client}", "--advertise-client-urls", f"http://127.0.0.1:{client}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"default=http://127.0.0.1:{peer}", "--unsafe-no-fsync", "--log-level", "warn",
            "--quota-backend-bytes", str(4 * 1024**3),
        ])
        self._wait("etcd", lambda: http_ok(f"http://127.0.0.1:{client}/health"))

    def _start_apiserver(self) -> None:
        port = free_port()
        self.ports["apiserver"] = port
        pki = self.root / "pki"
        audit_policy = self.root / "audit-policy.yaml"
        audit_policy.write_text("apiVersion: audit.k8s.io/v1\nkind: Policy\nrules:\n"
                                "- level: Metadata\n  omitStages: [RequestReceived]\n")
        self.spawn("kube-apiserver", [
            self.binary("kube-apiserver"), f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={port}",
            f"--cert-dir={pki}", f"--token-auth-file={pki / 'tokens.csv'}", "--authorization-mode=RBAC",
            f"--service-account-key-file={pki / 'sa.pub'}", f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--allow-privileged=true",
            f"--audit-policy-file={audit_policy}", f"--audit-log-path={self.logs / 'audit.log'}",
            "--audit-log-maxsize=200", "--audit-log-maxbackup=1",
            "--enable-priority-and-fairness=false", "--max-requests-inflight=2000",
            "--max-mutating-requests-inflight=1000",
        ])
        url = f"https://127.0.0.1:{port}"
        self._wait("kube-apiserver", lambda: self._api_ready(url), timeout=120)
        ca = pki / "apiserver.crt"
        self.kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "llmops-dev",
            "clusters": [{"name": "llmops-dev", "cluster": {"server": url, "certificate-authority": str(ca)}}],
            "users": [{"name": "admin", "user": {"token": self.admin_token}}],
            "contexts": [{"name": "llmops-dev", "context": {"cluster": "llmops-dev", "user": "admin"}}],
        }, indent=2))

    def _api_ready(self, url: str) -> bool:
        return http_ok(f"{url}/readyz", token=self.admin_token, verify=False)

    def _start_controllers(self) -> None:
        pki = self.root / "pki"
        self.spawn("kube-controller-manager", [
            self.binary("kube-controller-manager"), f"--kubeconfig={self.kubeconfig}", "--leader-elect=false",
            "--bind-address=127.0.0.1", f"--secure-port={free_port()}",
            f"--service-account-private-key-file={pki / 'sa.key'}", f"--root-ca-file={pki / 'apiserver.crt'}",
            "--controllers=*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller",
            "--use-service-account-credentials=false", "--kube-api-qps=200", "--kube-api-burst=400",
            "--concurrent-gc-syncs=20",
        ])
        self.spawn("kube-scheduler", [
            self.binary("kube-scheduler"), f"--kubeconfig={self.kubeconfig}", "--leader-elect=false",
            "--bind-address=127.0.0.1", f"--secure-port={free_port()}",
            f"--authentication-kubeconfig={self.kubeconfig}", f"--authorization-kubeconfig={self.kubeconfig}",
        ])

    def _start_kwok(self) -> None:
        stages = sorted((cache_dir() / "share" / "kwok-stages").glob("*.yaml"))
        self.spawn("kwok", [
            self.binary("kwok"), f"--kubeconfig={self.kubeconfig}", "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={nodes.KWOK_ANNOTATION}=fake",
            f"--server-address=127.0.0.1:{free_port()}", "--node-lease-duration-seconds=40",
            *(f"--config={s}" for s in stages),
        ])

    def install_kuberay_crds(self) -> None:
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(cache_dir() / "share" / "kuberay-crds"),
                     quiet=True)
        self.wait_crds_established(["rayjobs.ray.io", "rayclusters.ray.io", "rayservices.ray.io"])

    def start_kuberay(self, *flags: str) -> None:
        """The KubeRay operator at its defaults, plus `flags` (`--reconcile-concurrency=32`)."""
        self.ports["kuberay-metrics"] = free_port()
        self.ports["kuberay-probe"] = free_port()
        self.spawn("kuberay-operator", [
            self.binary("ray-operator"), "--enable-leader-election=false",
            f"--metrics-addr=127.0.0.1:{self.ports['kuberay-metrics']}",
            f"--health-probe-bind-address=127.0.0.1:{self.ports['kuberay-probe']}", *flags,
        ])
        self._wait("kuberay-operator", lambda: http_ok(f"http://127.0.0.1:{self.ports['kuberay-probe']}/readyz"))

    def start_kueue(self) -> None:
        """Kueue with only its RayJob integration. Its admission webhooks are not registered: Kueue's job
        reconciler suspends a RayJob that names a queue and has no admitted Workload, and unsuspends it once
        admitted, which is all queueing needs. The manager still serves its webhook port, so it gets a
        self-signed certificate."""
        if any(p.name == "kueue" and alive(p.pid) for p in self.processes):
            return
        if not (bin_dir() / "kueue").exists():
            raise PlaneError(f"{bin_dir() / 'kueue'} is missing: run `{BUILD_HINT}`")
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(cache_dir() / "share" / "kueue-crds"),
                     quiet=True)
        self.wait_crds_established(["clusterqueues.kueue.x-k8s.io", "localqueues.kueue.x-k8s.io",
                                    "resourceflavors.kueue.x-k8s.io", "workloads.kueue.x-k8s.io"])
        self.kubectl("create", "namespace", KUEUE_NAMESPACE, check=False, quiet=True)
        webhook_certs = self.root / "kueue-certs"
        _self_signed(webhook_certs)
        try:
            _self_signed(KUEUE_METRICS_CERTS)
        except OSError as e:
            raise PlaneError(f"Kueue needs a certificate in {KUEUE_METRICS_CERTS} and it cannot be written ({e}); "
                             "run as a user who may create it, or create tls.crt and tls.key there") from e
        self.ports["kueue-probe"] = free_port()
        config = self.root / "kueue-config.yaml"
        config.write_text(json.dumps({
            "apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration", "namespace": KUEUE_NAMESPACE,
            "health": {"healthProbeBindAddress": f"127.0.0.1:{self.ports['kueue-probe']}"},
            "metrics": {"bindAddress": "0"},
            "webhook": {"host": "127.0.0.1", "port": free_port(), "certDir": str(webhook_certs)},
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": False},
            "integrations": {"frameworks": ["ray.io/rayjob"]},
            "featureGates": {"VisibilityOnDemand": False},
        }, indent=2))
        self.spawn("kueue", [self.binary("kueue"), f"--config={config}"])
        self._wait("kueue", lambda: http_ok(f"http://127.0.0.1:{self.ports['kueue-probe']}/readyz"), timeout=90)

    def install_gateway_api(self) -> None:
        """The CRDs LLMService spec.expose writes: the Gateway API's (standard channel) and Envoy Gateway's
        SecurityPolicy (apiKey). No Gateway implementation runs here: routes are stored, not served."""
        for folder, names in (("gateway-api-crds", GATEWAY_API_CRDS), ("envoy-gateway-crds", ENVOY_GATEWAY_CRDS)):
            crds = cache_dir() / "share" / folder
            if not crds.is_dir():
                raise PlaneError(f"missing CRDs in {crds}: run `{BUILD_HINT}`")
            self.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crds), quiet=True)
            self.wait_crds_established(list(names))

    def _wait_default_service_account(self) -> None:
        self._wait("kube-controller-manager", lambda: self.kubectl(
            "get", "serviceaccount", "default", "-n", "default", check=False, quiet=True).returncode == 0, timeout=90)

    def wait_crds_established(self, names: list[str], timeout: float = 60) -> None:
        query = '{range .items[*]}{.metadata.name}={.status.conditions[?(@.type=="Established")].status}{"\\n"}{end}'

        def established() -> bool:
            out = self.kubectl("get", "crd", "-o", f"jsonpath={query}", check=False, quiet=True).stdout
            return {line.split("=")[0] for line in out.splitlines() if line.endswith("=True")} >= set(names)
        deadline = time.monotonic() + timeout
        while not established():
            if time.monotonic() > deadline:
                raise PlaneError(f"CRDs {', '.join(names)} not Established after {timeout:.0f}s")
            time.sleep(0.3)

    # ---- helpers ------------------------------------------------------------------------------------------
    def kubectl(self, *args: str, check: bool = True, quiet: bool = False,
                input: str | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run([self.binary("kubectl"), *args], env=self.env(), text=True, capture_output=True,
                                input=input)
        if check and result.returncode != 0:
            raise PlaneError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        if not quiet and result.stdout:
            print(result.stdout, end="")
        return result

    def _wait(self, name: str, ready, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        proc = next(p for p in reversed(self.processes) if p.name == name)
        while time.monotonic() < deadline:
            if not alive(proc.pid):
                raise PlaneError(f"{name} exited during start-up; see {proc.log}")
            try:
                if ready():
                    log(f"{name} ready")
                    return
            except Exception:
                pass
            time.sleep(0.3)
        raise PlaneError(f"{name} not ready after {timeout:.0f}s; see {proc.log}")


def _self_signed(folder: Path) -> None:
    """tls.crt and tls.key for 127.0.0.1 in `folder`, unless there already."""
    if (folder / "tls.crt").exists() and (folder / "tls.key").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(folder / "tls.key"),
                    "-out", str(folder / "tls.crt")], check=True, capture_output=True)
