"""Where the operator's time goes, phase by phase, on a plane `bench/controlplane.py --keep` left running.

    .venv/bin/python bench/controlplane_phases.py restart PLANE [--runs 5]   # a start with N at rest + 1 new
    .venv/bin/python bench/controlplane_phases.py burst PLANE [--n 100]     # one burst of new FineTunes

A copy of operator/ gets timing lines at its phase boundaries (the process start, its start-up hook, each listing,
the triggers, and per FineTune: watch event, reconcile start, reconcile slot, first round applied, the rest
applied), runs against PLANE as the
bench runs it (its ServiceAccount's kubeconfig), and the phases are printed and written to --out. A burst also
reports each process's CPU seconds from its first create to its last child (`cpu_s`: the plane's processes, the
operator, this tool), which shows whether the machine's cores were the limit. The copy's
lines write to stderr only; the operator's decisions are untouched. The kept plane must have a namespace
`llmops-N` of the bench's FineTunes (the restart) or room for a new namespace (the burst, deleted afterwards so
that the next start does not list it). `--operator-src` probes another copy of the operator (an A/B on one plane:
alternate the two, as a start with changed code marks every set it finds once).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator"), str(REPO / "tests"), str(REPO / "bench")]

from controlplane_bench.measure import proc_cpu_s  # noqa: E402
from controlplane_bench.plane import (collection_path, create_all, delete_namespaces, ensure_namespace,  # noqa: E402
                                     fine_tunes, run_async)
from llmops.dev.processes import free_port  # noqa: E402
from llmops.kube import Credentials, Kube  # noqa: E402

# (file, a line of it, what to write after it): `{at}` is the moment, `{name}` what it is about.
PROBES = [
    ("cli.py", "def main(argv: list[str] | None = None) -> int:",
     '    import time as _t; sys.stderr.write(f"PHASE main - {_t.time():.3f}\\n")'),
    ("handlers/main.py", '    options = memo.get("options", {})',
     '    import sys as _s, time as _t; _s.stderr.write(f"PHASE startup - {_t.time():.3f}\\n")'),
    ("handlers/informers.py", "        self.synced.set()",
     '        import sys as _s, time as _t; _s.stderr.write(f"PHASE triggered - {_t.time():.3f}\\n")'),
    ("handlers/informers.py", "        listed = await asyncio.gather(*(i.list_until_done() for i in self.informers))",
     '        import sys as _s, time as _t; _s.stderr.write(f"PHASE listed - {_t.time():.3f}\\n")'),
    ("handlers/main.py", '    key = (kind, meta["namespace"], meta["name"])',
     '    import sys as _s, time as _t; _s.stderr.write(f"PHASE event {meta[\'namespace\']}/{meta[\'name\']} {_t.time():.3f}\\n")'),
    ("handlers/engine.py", '        attempt = ""   # what this reconcile set out to write, fingerprinted before the plan annotates it',
     '        import sys as _s; _s.stderr.write(f"PHASE reconcile {key[1]}/{key[2]} {time.time():.3f}\\n")'),
    ("handlers/engine.py", "            async with self._slots.slot(later=key in self._later):",
     '                _s.stderr.write(f"PHASE slot {key[1]}/{key[2]} {time.time():.3f}\\n")'),
    ("handlers/engine.py", "                        await self._apply_first(plan)",
     '                        _s.stderr.write(f"PHASE first_applied {key[1]}/{key[2]} {time.time():.3f}\\n")'),
    ("handlers/engine.py", "                await self._apply_rest(plan)",
     '                _s.stderr.write(f"PHASE rest_applied {key[1]}/{key[2]} {time.time():.3f}\\n")'),
]


def probed_copy(into: Path, source: Path = REPO / "operator") -> Path:
    shutil.copytree(source / "llmops", into / "llmops")
    shutil.copytree(source / "payloads", into / "payloads")
    for file, anchor, probe in PROBES:
        path = into / "llmops" / file
        text = path.read_text()
        if anchor not in text:
            raise SystemExit(f"{file} no longer has the line the probe follows: {anchor!r}")
        path.write_text(text.replace(anchor, f"{anchor}\n{probe}", 1))
    return into


def admin(plane: Path) -> Kube:
    config = json.loads((plane / "kubeconfig").read_text())
    cluster = config["clusters"][0]["cluster"]
    token = (plane / "pki" / "tokens.csv").read_text().split(",", 1)[0]
    return Kube(Credentials(server=cluster["server"], token=token, ca_path=cluster["certificate-authority"]),
                "llmops-bench", user_agent="llmops-bench")


def start(plane: Path, src: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "KUBECONFIG": str(plane / "operator.kubeconfig"), "PYTHONPATH": str(src)}
    return subprocess.Popen([sys.executable, "-m", "llmops.cli", "run", f"--probe-port={free_port()}",
                             "--metrics-port=0", "--log-format=plain"], env=env, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)


def phases(log: Path, since: float) -> dict[str, dict[str, float]]:
    """what -> name -> the first moment at or after `since`."""
    out: dict[str, dict[str, float]] = {}
    for line in log.read_text(errors="replace").splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0] == "PHASE" and float(parts[3]) >= since:
            out.setdefault(parts[1], {}).setdefault(parts[2], float(parts[3]))
    return out


def exists(kube: Kube, api_version: str, kind: str, namespace: str, name: str) -> bool:
    async def get() -> bool:
        try:
            return await kube.get(api_version, kind, namespace, name) is not None
        finally:
            await kube.close()
    return run_async(get())


def restart(args: argparse.Namespace, src: Path) -> list[dict[str, float]]:
    """A start with the plane's FineTunes at rest; one FineTune created as the process starts, as the bench does."""
    namespace = f"llmops-{args.at_rest}"
    runs = []
    for i in range(args.runs):
        name = f"phases-{int(time.time())}-{i}"
        log = args.logs / f"restart-{i}.log"
        t0 = time.time()
        proc = start(args.plane, src, log)
        body = fine_tunes(1, namespace)[0]
        body["metadata"]["name"] = name
        run_async(create_all(admin(args.plane), [body], collection_path))
        created = time.time()
        while not exists(admin(args.plane), "ray.io/v1", "RayJob", namespace, f"{name}-ft"):
            time.sleep(0.05)
            if time.time() - created > 120:
                raise SystemExit(f"no RayJob for {name} after 120 s; see {log}")
        done = time.time()
        stop(proc)
        seen = phases(log, t0)
        runs.append({"process_to_startup_s": round(seen["startup"]["-"] - t0, 3),
                     "listing_s": round(seen["listed"]["-"] - seen["startup"]["-"], 3),
                     "triggers_s": round(seen["triggered"]["-"] - seen["listed"]["-"], 3),
                     "creation_to_rayjob_s": round(done - created, 3)})
        time.sleep(args.pause)
    return runs


class CpuSampler(threading.Thread):
    """Each process's CPU seconds so far, every few tens of milliseconds: what the machine's cores did during a
    window that is known only afterwards (the burst, from its first create to its last child)."""

    def __init__(self, pids: dict[str, int], every: float = 0.02):
        super().__init__(daemon=True)
        self.pids, self.every, self.samples = pids, every, []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            row = {"t": time.time()}
            for name, pid in self.pids.items():
                try:
                    row[name] = proc_cpu_s(pid)
                except OSError:
                    pass
            self.samples.append(row)
            time.sleep(self.every)

    def between(self, t0: float, t1: float) -> dict[str, float]:
        self.join()
        first = min(self.samples, key=lambda r: abs(r["t"] - t0))
        last = min(self.samples, key=lambda r: abs(r["t"] - t1))
        return {"window_s": round(last["t"] - first["t"], 3),
                **{name: round(last[name] - first[name], 3) for name in self.pids if name in first and name in last}}


def plane_pids(plane: Path) -> dict[str, int]:
    state = json.loads((plane / "state.json").read_text())
    return {p["name"]: p["pid"] for p in state["processes"] if Path(f"/proc/{p['pid']}").exists()}


def burst(args: argparse.Namespace, src: Path) -> dict[str, dict[str, float]]:
    """One burst of new FineTunes in a new namespace: each one's steps, from the moment its create returned."""
    log = args.logs / "burst.log"
    proc = start(args.plane, src, log)
    time.sleep(args.pause)
    sampler = CpuSampler({**plane_pids(args.plane), "llmops": proc.pid, "bench": os.getpid()})
    sampler.start()
    namespace = f"phases-{int(time.time())}"
    run_async(ensure_namespace(admin(args.plane), namespace))
    time.sleep(1)
    made = run_async(create_all(admin(args.plane), fine_tunes(args.n, namespace), collection_path))
    made = {f"{namespace}/{name}": times for name, times in made.items()}
    time.sleep(args.pause)
    stop(proc)
    sampler.halt.set()
    # gone before the next start, which would otherwise list them and, for another operator's code, mark them again
    run_async(delete_namespaces(admin(args.plane), [namespace], 300))
    t0 = min(sent for sent, _, _ in made.values())
    seen = phases(log, t0)
    out: dict = {}
    done = [seen.get("rest_applied", {}).get(name) for name in made]
    if all(done):   # the cores' time from the first create to the last child
        out["cpu_s"] = sampler.between(t0, max(done))
    if args.timeline:   # each FineTune's steps from the burst's first create, in the order they were created
        out["timeline"] = [[name, round(returned - t0, 3), *(round(seen.get(step, {}).get(name, float("nan")) - t0, 3)
                                                             for step in ("slot", "first_applied", "rest_applied"))]
                           for name, (_, returned, _) in sorted(made.items(), key=lambda kv: kv[1][1])]
    for step in ("event", "reconcile", "slot", "first_applied", "rest_applied"):
        after = [seen.get(step, {}).get(name, float("nan")) - returned for name, (_, returned, _) in made.items()]
        after = sorted(x for x in after if x == x)
        if after:
            out[step] = {"count": len(after), "p50_s": round(after[len(after) // 2], 3),
                         "p99_s": round(after[min(len(after) - 1, int(0.99 * len(after)))], 3),
                         "max_s": round(after[-1], 3)}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("restart", "burst"))
    p.add_argument("plane", type=Path, help="the kept plane's folder (/tmp/llmops-bench-N-...)")
    p.add_argument("--runs", type=int, default=5, help="restart: how many starts")
    p.add_argument("--at-rest", type=int, default=5000, help="restart: the N of the plane's llmops-N namespace")
    p.add_argument("--n", type=int, default=100, help="burst: how many FineTunes")
    p.add_argument("--timeline", action="store_true", help="burst: also each FineTune's steps (created, slot, "
                   "first round, rest) from the burst's first create")
    p.add_argument("--operator-src", type=Path, default=REPO / "operator",
                   help="the operator's source folder to probe (default: this checkout's)")
    p.add_argument("--pause", type=float, default=6.0, help="seconds to let the operator settle around each step")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "controlplane_phases.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        args.logs = Path(tmp)
        src = probed_copy(Path(tmp) / "src", args.operator_src)
        result = restart(args, src) if args.what == "restart" else burst(args, src)
    report = json.loads(args.out.read_text()) if args.out.exists() else {}
    report[args.what] = {"when": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                         "commit": subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                                  capture_output=True, text=True).stdout.strip(),
                         "command": f"{args.what} PLANE " + " ".join(sys.argv[3:]), "result": result}
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    if args.what == "restart":
        for key in result[0]:
            values = [r[key] for r in result]
            print(f"{key:22s} min {min(values):.2f}  median {statistics.median(values):.2f}  max {max(values):.2f}")
    else:
        for step, figures in result.items():
            if step == "timeline":
                continue
            if step == "cpu_s":
                print("cpu_s      " + "  ".join(f"{k} {v:.2f}" for k, v in figures.items()))
                continue
            print(f"{step:10s} " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in figures.items()))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
