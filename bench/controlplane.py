#!/usr/bin/env python3
"""Control-plane scale and efficiency: the llmops operator and the KubeRay operator, side by side, in one run.

    .venv/bin/python bench/controlplane.py --n 100 --n 1000 --repeat 5        # or, without the venv:
    PYTHONPATH=operator:tests python3 bench/controlplane.py --n 100 --n 1000 --repeat 5
    .venv/bin/python bench/controlplane.py --n 5000 --skip kuberay-equal --timeout 3600 --append
    .venv/bin/python bench/controlplane.py --n 50 --idle-at 50 --idle 60 --out /tmp/cp.json   # a quick check

For every N it starts a fresh LocalPlane (real etcd, kube-apiserver with an audit log, controller-manager,
scheduler, kwok, the real KubeRay binary) in a temp folder, adds a large simulated node pool so every Ray pod
can be placed (nothing stays Pending for lack of room, so the scheduler does not retry pods during the idle
window), and runs, in this order:

1. llmops burst, KubeRay stopped: N FineTunes -> every child. A FineTune's children are what the operator's
   FineTune builder renders for it (RayJob, ServiceAccount, Role, RoleBinding, job and result ConfigMaps, the
   namespace's shared payload ConfigMap); a watch on each kind times when the last of them appeared. A FineTune
   missing a child has no time, and a p99 over fewer than N is never judged (the verdict misses).
2. Hand-off, both running: KubeRay is started and takes the N RayJobs; we time how fast FineTune status follows
   (RayJob Running -> FineTune phase Running) and count our status writes against the status changes a watch saw.
3. No-op: every FineTune is touched (an annotation): each touch is a reconcile that must write nothing.
4. Idle, at the sizes in --idle-at (default 1000): everything at rest for --idle seconds (default 600); every
   request of the operator process counts, watch renewals included (see "requests" below).
5. With --repeat K (N <= 100): K - 1 more bursts of ours, each into a fresh namespace, KubeRay stopped; the
   N = 100 targets are judged on the median burst. Their namespaces are deleted before KubeRay runs again.
6. Restart with N at rest, then one new FineTune: how soon its RayJob exists, what is written for the others.
7. KubeRay bursts, ours stopped, each from a fresh KubeRay process in its own namespace: N RayJobs exactly as
   our builder renders them for N FineTunes (owner references dropped; their ServiceAccounts and ConfigMaps
   created first, untimed) -> RayCluster. First at KubeRay's defaults ("kuberay_burst", followed until every
   RayJob ends), then with --reconcile-concurrency equal to our reconcile slots ("kuberay_equal_burst", until
   every RayCluster exists). The first one's namespace is deleted before the second starts.
--skip leaves out handoff, noop, restart, kuberay-default or kuberay-equal; --append adds a run's sizes to the
results in --out, and the verdicts are computed over all of them.

Times come from watches (never polling) on this side; each object's create time is the moment its create
request returned (creationTimestamp has 1 s resolution; it is kept too). API requests come from the API
server's audit log: the operator runs as its own ServiceAccount, so every request of that user is ours whatever
its user agent (`llmops-operator` for its requests, `kopf/<version>` for any of kopf's own, anything else
"operator-other"); `ray-operator/...` is KubeRay. RSS and CPU come from /proc of each pid.

Prints a table and writes bench/results/controlplane.json (see --out): every verdict under `verdicts` with `key`,
`target`, `value` and `pass`, and each verdict's value also as a top-level key.
"""

from __future__ import annotations

import argparse
import datetime
import json
import signal
import sys
from pathlib import Path
from typing import Any

from compact_json import compact
from controlplane_bench import REPO  # (and operator/, tests/ on the path)
from controlplane_bench.measure import REPEAT_MAX_N, TARGETS, log
from controlplane_bench.phases import SKIPPABLE, run_size
from controlplane_bench.report import headlines, machine_summary, table, verdicts, versions


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, action="append", help="burst size (repeatable; default 100 and 1000)")
    p.add_argument("--idle", type=float, default=TARGETS["idle_window_min_s"],
                   help="idle window, seconds (the target is judged over at least %(default).0f)")
    p.add_argument("--idle-at", type=int, action="append",
                   help="sizes whose run includes the idle window (repeatable; default 1000)")
    p.add_argument("--skip", action="append", default=[], choices=SKIPPABLE,
                   help="leave out this phase at every size of the run (repeatable)")
    p.add_argument("--quiet", type=float, default=5.0, help="seconds without requests that end a phase")
    p.add_argument("--timeout", type=float, default=900.0, help="limit for each wait, seconds")
    p.add_argument("--out", default=str(REPO / "bench/results/controlplane.json"))
    p.add_argument("--profile", default="",
                   help="folder for py-spy profiles of the operator (burst, hand-off, idle, restart)")
    p.add_argument("--keep", action="store_true", help="leave each plane running (debugging)")
    p.add_argument("--restart-timeout", type=float, default=120.0,
                   help="how long a restarted operator may take to handle a new FineTune")
    p.add_argument("--operator-src", default="",
                   help="run the operator from this source root instead of ./operator (a scratch copy with a fix)")
    p.add_argument("--repeat", type=int, default=1,
                   help=f"bursts of each size up to {REPEAT_MAX_N} (each in a fresh namespace, after the idle "
                        "window); the N=100 p99 targets are judged on their median")
    p.add_argument("--kuberay-until", choices=("finished", "clusters"), default="finished",
                   help="end KubeRay's default burst when every RayJob finished, or once every RayCluster exists "
                        "(at N=5000, following 5000 jobs at its concurrency of 1 takes hours)")
    p.add_argument("--append", action="store_true",
                   help="add these sizes to the results already in --out (same N replaced)")
    p.add_argument("--merge", default="",
                   help="run nothing: add the sizes of this result file (a run on another machine, e.g. by "
                        "bench/controlplane_device.sh) to --out, as --append would have")
    args = p.parse_args(argv)
    if args.merge:
        run = json.loads(Path(args.merge).read_text())
        report = with_earlier({k: v for k, v in run.items() if k not in ("earlier_runs", "verdicts")},
                              json.loads(Path(args.out).read_text()), {r["n"] for r in run["results"]})
        save(report, Path(args.out))
        print(table(report))
        return 0
    # an interrupt stops the planes (the `finally`s), also in a run started in the background, which ignores it
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sizes = args.n or [100, 1000]
    args.idle_at = set(args.idle_at or [1000])
    args.skip = set(args.skip)
    report: dict[str, Any] = {"when": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
                              "machine": machine_summary(), "versions": versions(),
                              "command": " ".join(["bench/controlplane.py", *(argv or sys.argv[1:])]),
                              "profiled": bool(args.profile), "targets": TARGETS,
                              "operator_src": args.operator_src or "operator",
                              "fairness": "each operator's burst runs alone on the same plane (the other operator "
                                          "stopped), so neither takes CPU from the other on a 2-core machine; both "
                                          "run for the hand-off, the no-op check and the idle window. Ours runs "
                                          "first, on the empty plane, as after an install; each KubeRay burst "
                                          "runs last, in its own namespace, from a freshly started KubeRay "
                                          "process, with ours stopped and the previous KubeRay burst's namespace "
                                          "deleted",
                              "results": []}
    if args.append and Path(args.out).exists():
        report = with_earlier(report, json.loads(Path(args.out).read_text()), set(sizes))
    for n in sizes:
        # each size names its machine: --append may add sizes measured on another one
        report["results"].append({**run_size(n, args), "machine": report["machine"]["summary"]})
        report["results"].sort(key=lambda r: r["n"])
        save(report, Path(args.out))
    print(table(report))
    log(f"wrote {args.out}")
    return 0


def save(report: dict[str, Any], out: Path) -> None:
    """The headline figures and verdicts computed again over every size, then the file written."""
    report.update(headlines(report["results"]))
    report["verdicts"] = verdicts(report["results"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(compact(report))


def with_earlier(report: dict[str, Any], earlier: dict[str, Any], sizes: set[int]) -> dict[str, Any]:
    """`report` with the sizes of an earlier result that it does not measure again, and that run's header."""
    # sizes kept from the earlier file keep naming the machine that measured them
    kept = [{"machine": earlier["machine"]["summary"], **r} for r in earlier["results"] if r["n"] not in sizes]
    results = sorted([*kept, *report["results"]], key=lambda r: r["n"])
    return {**report, "results": results,
            "earlier_runs": [{k: earlier.get(k) for k in ("when", "machine", "versions", "command")},
                             *earlier.get("earlier_runs", [])]}


if __name__ == "__main__":
    sys.exit(main())
