"""`llmops demo`: the ViGGO workflow on the local control plane, end to end.

Real: kube-apiserver, etcd, controller-manager, scheduler, kwok nodes (a CPU node and two 4 x L4 nodes), the KubeRay
operator and the llmops operator. SIMULATED (and said so on screen): the Ray jobs' own work, which needs GPUs,
images and model weights that this machine cannot have.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..api import KINDS
from .install import install_crds
from .plane import LocalPlane, cache_dir, free_port, log
from .simulator import Simulator

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = REPO / "examples" / "viggo"
EXAMPLE_FILES = ("finetune.yaml", "batchinference.yaml", "llmservice.yaml")   # applied in this order
NAMESPACE = "default"
BANNER = """
+--------------------------------------------------------------------------------------------------+
| llmops demo on the local control plane                                                           |
| REAL: kube-apiserver, etcd, scheduler, controller-manager, KubeRay operator, llmops operator.    |
| SIMULATED: the GPU nodes (kwok) and the Ray jobs' work (a data-plane simulator writes the        |
| payload's result report with the job's own ServiceAccount, and sets the RayJob's end state).     |
+--------------------------------------------------------------------------------------------------+
"""


def _secrets(plane: LocalPlane) -> None:
    for name, key in (("hf-token", "token"), ("s3-credentials", "AWS_ACCESS_KEY_ID")):
        manifest = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": NAMESPACE},
                    "stringData": {key: "demo-placeholder"}}
        plane.kubectl("apply", "-f", "-", input=json.dumps(manifest), quiet=True)


def _statuses(plane: LocalPlane) -> dict[str, dict]:
    out = {}
    for kind in KINDS.values():
        items = json.loads(plane.kubectl("get", kind.plural, "-n", NAMESPACE, "-o", "json", quiet=True).stdout)
        for item in items["items"]:
            out[f"{kind.kind}/{item['metadata']['name']}"] = item.get("status") or {}
    return out


def _done(statuses: dict[str, dict]) -> bool:
    ft = statuses.get("FineTune/viggo", {})
    bi = statuses.get("BatchInference/viggo-eval", {})
    svc = statuses.get("LLMService/viggo-serve", {})
    adapters = {a.get("name"): a.get("state") for a in svc.get("adapters") or []}
    return ft.get("phase") == "Succeeded" and bi.get("phase") == "Succeeded" and adapters.get("viggo") == "Serving"


def _clear_earlier_run(plane: LocalPlane) -> None:
    """The demo runs the workflow every time: what an earlier demo left on this plane (its data outlives the
    processes) goes first, children included (foreground deletion waits for the garbage collector), so the
    resources start from nothing instead of showing the old run's state as "unchanged"."""
    files = [str(EXAMPLES / name) for name in reversed(EXAMPLE_FILES)]
    found = plane.kubectl("get", *(a for f in files for a in ("-f", f)), "--ignore-not-found", "-o", "name",
                          quiet=True).stdout.split()
    if found:
        log(f"removing the earlier demo run's {', '.join(found)} and their children")
        plane.kubectl("delete", *(a for f in files for a in ("-f", f)), "--ignore-not-found",
                      "--cascade=foreground", "--wait", "--timeout=180s", quiet=True)


def main(keep: bool = False, timeout: float = 240) -> int:
    print(BANNER, flush=True)
    root = Path(os.environ.get("LLMOPS_DEV_DIR", cache_dir() / "dev")).expanduser()
    started_plane = False
    if (root / "state.json").exists() and all(LocalPlane.load(root).status().values()):
        plane = LocalPlane.load(root)
        log(f"using the running local plane in {root}")
    else:
        plane = LocalPlane(root)
        plane.start()
        started_plane = True
    install_crds(plane)
    operator_log = plane.logs / "operator.log"
    env = {**plane.env(), "PYTHONPATH": str(REPO / "operator")}
    operator = subprocess.Popen([sys.executable, "-m", "llmops.cli", "run", f"--probe-port={free_port()}",
                                 f"--metrics-port={free_port()}", "--log-format=plain"],
                                env=env, stdout=open(operator_log, "ab"), stderr=subprocess.STDOUT,
                                start_new_session=True)
    log(f"llmops operator started (pid {operator.pid}, log {operator_log})")
    simulator = Simulator(plane.kubeconfig, run_seconds=6)
    stop = threading.Event()

    def simulate() -> None:
        while not stop.is_set():
            try:
                simulator.step()
            except Exception as e:  # keep simulating; the plane may be busy
                log(f"simulator: {e}")
            stop.wait(1)
    threading.Thread(target=simulate, daemon=True).start()
    try:
        _secrets(plane)
        _clear_earlier_run(plane)
        for name in EXAMPLE_FILES:
            plane.kubectl("apply", "-f", str(EXAMPLES / name))
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            table = plane.kubectl("get", "llmops", "-n", NAMESPACE, quiet=True).stdout
            if table != last:
                print(f"\n$ kubectl get llmops   ({time.strftime('%H:%M:%S')})\n{table}", end="", flush=True)
                last = table
            if _done(_statuses(plane)):
                break
            if operator.poll() is not None:
                log(f"the operator exited ({operator.returncode}); see {operator_log}")
                return 1
            time.sleep(2)
        statuses = _statuses(plane)
        print("\n$ kubectl get rayjobs,rayservices,rayclusters,pods -n default -o wide")
        plane.kubectl("get", "rayjobs,rayservices,rayclusters,pods", "-n", NAMESPACE, "-o", "wide")
        print("\nStatus of each resource:")
        for key, status in statuses.items():
            shown = {k: v for k, v in status.items() if k not in ("conditions",)}
            print(f"\n{key}:\n" + json.dumps(shown, indent=2))
        if not _done(statuses):
            print(f"\nthe workflow did not finish within {timeout:.0f}s; operator log: {operator_log}")
            return 1
        print("\nThe workflow ran: FineTune -> adapter, BatchInference -> metrics (simulated numbers), "
              "LLMService -> RayService with the adapter enabled once its evaluation gate passed.\n"
              "Ray Serve cannot start on simulated nodes, so the LLMService stays Pending here; on a GPU cluster "
              "it becomes Ready and answers model=\"ft-model:viggo\" (README: Serving).")
        return 0
    finally:
        stop.set()
        if keep:
            print(f"\nleft running: export KUBECONFIG={plane.kubeconfig}; operator pid {operator.pid}")
        else:
            operator.terminate()
            operator.wait(20)
            if started_plane:
                plane.stop()
