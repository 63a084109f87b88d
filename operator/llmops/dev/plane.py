"""A real local control plane: etcd, kube-apiserver, controller-manager, scheduler, kwok and KubeRay.

Everything listens on loopback with free ports; data, credentials and logs live in one folder. Binaries come
from ``tools/controlplane/build.py`` (``$LLMOPS_CACHE/bin``). The same class serves ``llmops dev up`` and the
pytest session fixture.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from . import nodes

REPO = Path(__file__).resolve().parents[3]
BUILD_SCRIPT = REPO / "tools" / "controlplane" / "build.py"
BUILD_HINT = f"{sys.executable} {BUILD_SCRIPT.relative_to(REPO) if BUILD_SCRIPT.exists() else BUILD_SCRIPT}"
SERVICE_CIDR = "10.96.0.0/16"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "kwok",
            "ray-operator")


def cache_dir() -> Path:
    return Path(os.environ.get("LLMOPS_CACHE", Path.home() / ".cache" / "llmops")).expanduser()


def bin_dir() -> Path:
    return cache_dir() / "bin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(message: str) -> None:
    print(f"[llmops dev {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class PlaneError(RuntimeError):
    pass


@dataclass
class Process:
    name: str
    pid: int
    log: str


@dataclass
class LocalPlane:
    """One local control plane rooted at `root` (created if missing)."""

    root: Path
    pools: tuple[nodes.Pool, ...] = nodes.DEFAULT_POOLS
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
            self.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(cache_dir() / "share" / "kuberay-crds"),
                         quiet=True)
            self.wait_crds_established(["rayjobs.ray.io", "rayclusters.ray.io", "rayservices.ray.io"])
            if with_kuberay:
                self.start_kuberay()
            self._wait_default_service_account()
        except Exception:
            self.print_logs_hint()
            self.stop()
            raise
        self.save_state()

    def stop(self) -> None:
        """End only the processes this plane started, newest first."""
        for proc in reversed(self.processes):
            _terminate(proc.pid)
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
        return {p.name: _alive(p.pid) for p in self.processes}

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
        self._wait("etcd", lambda: _http_ok(f"http://127.0.0.1:{client}/health"))

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
        return _http_ok(f"{url}/readyz", token=self.admin_token, verify=False)

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

    def start_kuberay(self) -> None:
        self.ports["kuberay-metrics"] = free_port()
        self.ports["kuberay-probe"] = free_port()
        self.spawn("kuberay-operator", [
            self.binary("ray-operator"), "--enable-leader-election=false",
            f"--metrics-addr=127.0.0.1:{self.ports['kuberay-metrics']}",
            f"--health-probe-bind-address=127.0.0.1:{self.ports['kuberay-probe']}",
        ])
        self._wait("kuberay-operator", lambda: _http_ok(f"http://127.0.0.1:{self.ports['kuberay-probe']}/readyz"))

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
            if not _alive(proc.pid):
                raise PlaneError(f"{name} exited during start-up; see {proc.log}")
            try:
                if ready():
                    log(f"{name} ready")
                    return
            except Exception:
                pass
            time.sleep(0.3)
        raise PlaneError(f"{name} not ready after {timeout:.0f}s; see {proc.log}")


def _http_ok(url: str, token: str | None = None, verify: bool = True) -> bool:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    context = None if verify else ssl._create_unverified_context()
    try:
        with urllib.request.urlopen(request, timeout=2, context=context) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _terminate(pid: int, grace: float = 10) -> None:
    if not _alive(pid):
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _alive(pid):
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.1)
    if _alive(pid):
        os.killpg(pid, signal.SIGKILL)
