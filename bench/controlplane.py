#!/usr/bin/env python3
"""Control-plane scale and efficiency: the llmops operator and the KubeRay operator, side by side, in one run.

    .venv/bin/python bench/controlplane.py --n 100 --n 1000 --repeat 5   # or, without the venv:
    PYTHONPATH=operator:tests python3 bench/controlplane.py --n 100 --n 1000 --repeat 5

For every N it starts a fresh LocalPlane (real etcd, kube-apiserver with an audit log, controller-manager,
scheduler, kwok, the real KubeRay binary) in a temp folder, adds a large simulated node pool so every Ray pod
can be placed (nothing stays Pending for lack of room, so the scheduler does not retry pods during the
steady-state window), and runs four phases:

1. KubeRay burst, our operator not running: N RayJobs exactly as our builder renders them for N FineTunes
   (owner references dropped; their ServiceAccounts and ConfigMaps created first, untimed) -> RayCluster.
2. llmops burst, KubeRay stopped: N FineTunes -> RayJob. Each operator is timed alone on the same plane, so
   neither competes with the other for the two cores and the ratio compares like with like.
3. Hand-off, both running: KubeRay is started and takes the N RayJobs from phase 2; we time how fast FineTune
   status follows (RayJob Running -> FineTune phase Running) and count our status writes against the status
   changes a watch saw. Then every FineTune is touched (an annotation): each touch is a reconcile that finds
   nothing to change and must write nothing.
4. Steady state, both running, everything at rest: requests and CPU of the operator over --steady seconds.
5. With --repeat K (N <= 100): K - 1 more bursts of ours, each into a fresh namespace, KubeRay stopped again; the
   N = 100 p99 target is judged on the median burst. Their namespaces are deleted before KubeRay runs again.

Times come from watches (never polling) on this side; each object's create time is the moment its create
request returned (creationTimestamp has 1 s resolution; it is kept too). API requests come from the API
server's audit log, by user agent: `llmops-operator` (our writes) plus `kopf/<version>` (kopf's lists and
watches) make the operator process; `ray-operator/...` is KubeRay. RSS and CPU come from /proc of each pid.

Prints a table and writes bench/results/controlplane.json (see --out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

from compact_json import compact
from controlplane_bench import REPO  # (and operator/, tests/ on the path)
from controlplane_bench.measure import REPEAT_MAX_N, TARGETS, log
from controlplane_bench.phases import run_size
from controlplane_bench.report import machine_summary, table, verdicts, versions


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, action="append", help="burst size (repeatable; default 100 and 1000)")
    p.add_argument("--steady", type=float, default=60.0, help="steady-state window, seconds")
    p.add_argument("--quiet", type=float, default=5.0, help="seconds without requests that end a phase")
    p.add_argument("--timeout", type=float, default=900.0, help="limit for each wait, seconds")
    p.add_argument("--out", default=str(REPO / "bench/results/controlplane.json"))
    p.add_argument("--profile", default="", help="folder for py-spy profiles of the operator (burst, hand-off)")
    p.add_argument("--keep", action="store_true", help="leave each plane running (debugging)")
    p.add_argument("--restart-timeout", type=float, default=120.0,
                   help="how long a restarted operator may take to handle a new FineTune")
    p.add_argument("--operator-src", default="",
                   help="run the operator from this source root instead of ./operator (a scratch copy with a fix)")
    p.add_argument("--ours-only", type=int, action="append", default=[],
                   help="for this N run only our operator's phases (no KubeRay burst, no hand-off): for sizes "
                        "where KubeRay's burst would not finish in reasonable time on this machine")
    p.add_argument("--repeat", type=int, default=1,
                   help=f"bursts of each size up to {REPEAT_MAX_N} (each in a fresh namespace, after the steady "
                        "state); the N=100 p99 target is judged on their median")
    p.add_argument("--append", action="store_true",
                   help="add these sizes to the results already in --out (same N replaced)")
    args = p.parse_args(argv)
    sizes = args.n or ([] if args.ours_only else [100, 1000])
    args.ours_only = set(args.ours_only)
    sizes += sorted(args.ours_only - set(sizes))
    report: dict[str, Any] = {"when": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
                              "machine": machine_summary(), "versions": versions(),
                              "command": " ".join(["bench/controlplane.py", *(argv or sys.argv[1:])]),
                              "profiled": bool(args.profile), "targets": TARGETS,
                              "operator_src": args.operator_src or "operator",
                              "fairness": "each operator's burst runs alone on the same plane (the other operator "
                                          "stopped), so neither takes CPU from the other on a 2-core machine; both "
                                          "run for the hand-off, the no-op check and the steady state. Ours runs "
                                          "first, on the empty plane (it cannot start once a watched kind has more "
                                          "than 200 objects: see restart); KubeRay's burst runs last, in its own "
                                          "namespace, from a freshly started KubeRay process, with ours stopped",
                              "results": []}
    if args.append and Path(args.out).exists():
        earlier = json.loads(Path(args.out).read_text())
        report["results"] = [r for r in earlier["results"] if r["n"] not in sizes]
        report["earlier_runs"] = [{k: earlier.get(k) for k in ("when", "machine", "versions", "command")},
                                  *earlier.get("earlier_runs", [])]
    for n in sizes:
        report["results"].append(run_size(n, args))
        report["results"].sort(key=lambda r: r["n"])
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        report["verdicts"] = verdicts(report["results"])
        Path(args.out).write_text(compact(report))
    print(table(report))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
