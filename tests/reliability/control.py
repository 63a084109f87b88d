"""Driving the plane the way failures do: operators started and killed, the API server stopped and started
again, the simulated data plane in a background thread."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from integration.harness import OperatorProcess
from llmops.dev.plane import LocalPlane, Process
from llmops.dev.processes import alive
from llmops.dev.simulator import Simulator


class Operators:
    """`llmops run` processes of one test: started, killed, restarted; all stopped at the end of the test."""

    def __init__(self, plane: LocalPlane, folder: Path):
        self.plane = plane
        self.folder = folder
        self.started: list[OperatorProcess] = []

    def start(self, namespace: str, *args: str, name: str | None = None, env: dict[str, str] | None = None
              ) -> OperatorProcess:
        name = name or f"operator-{len(self.started)}"
        proc = OperatorProcess(self.plane, self.folder / f"{name}.log", env_extra=env,
                               args=("--namespace", namespace, *args))
        self.started.append(proc)
        return proc.start()

    def logs(self) -> str:
        return "\n".join(p.log() for p in self.started if p.log_path.exists())

    def stop_all(self) -> None:
        for proc in self.started:
            proc.stop(signal.SIGKILL)


def unhandled_errors(log: str) -> list[str]:
    """Lines of an operator log that show an unhandled exception (ours or a kopf handler's)."""
    return [line for line in log.splitlines() if "Traceback" in line or "failed with an exception" in line]


# ---- the simulated data plane, in the background ------------------------------------------------------------------
@contextmanager
def simulator_running(plane: LocalPlane, namespace: str, run_seconds: float = 0.0, interval: float = 0.5
                      ) -> Iterator[Simulator]:
    """The simulator finishing every Running RayJob of `namespace`, in a thread, until the block ends."""
    sim = Simulator(plane.kubeconfig, run_seconds=run_seconds, namespace=namespace)
    stop = threading.Event()
    errors: list[str] = []

    def loop() -> None:
        while not stop.is_set():
            try:
                sim.step()
            except Exception as e:  # the API server may be restarting; the next pass retries
                errors.append(repr(e))
            stop.wait(interval)
    thread = threading.Thread(target=loop, name="simulator", daemon=True)
    thread.start()
    try:
        yield sim
    finally:
        stop.set()
        thread.join(30)


# ---- the API server, stopped and started again ---------------------------------------------------------------------
def restart_apiserver(plane: LocalPlane, down_seconds: float, sig: int = signal.SIGTERM) -> float:
    """Stop only the kube-apiserver (its process group) and start it again with the same arguments (same port,
    certificates, etcd, keys), as plane.py spawned it. Returns the seconds it was unreachable."""
    old = next(p for p in plane.processes if p.name == "kube-apiserver")
    args = Path(f"/proc/{old.pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    args = [a.decode() for a in args]
    went = time.monotonic()
    os.killpg(old.pid, sig)
    # After SIGTERM it stops listening at once, then may linger ~30 s draining; past 10 s it is killed.
    deadline = time.monotonic() + 10
    while alive(old.pid) and time.monotonic() < deadline:
        try:
            os.waitpid(old.pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.1)
    if alive(old.pid):
        os.killpg(old.pid, signal.SIGKILL)
    plane.processes = [p for p in plane.processes if p.pid != old.pid]
    time.sleep(max(0.0, down_seconds - (time.monotonic() - went)))
    new: Process = plane.spawn("kube-apiserver", args)
    url = json.loads(plane.kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
    plane._wait("kube-apiserver", lambda: plane._api_ready(url), timeout=120)
    plane.save_state()
    assert new.pid != old.pid
    return time.monotonic() - went


@contextmanager
def paused(plane: LocalPlane, name: str) -> Iterator[None]:
    """One plane component stopped (SIGSTOP) for the block: e.g. the controller-manager, whose garbage collector
    then falls behind, as it does in a busy cluster."""
    proc = next(p for p in plane.processes if p.name == name)
    os.killpg(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(proc.pid, signal.SIGCONT)
