"""One size on one plane: ours (burst, hand-off, no-op reconciles, idle, repeat bursts, restart), then KubeRay's
bursts (kuberay.py)."""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from integration.harness import OperatorProcess
from llmops.dev.plane import LocalPlane
from manifests import finetune

from .kuberay import kuberay_bursts
from .measure import (OPERATOR, REPEAT_MAX_N, AuditLog, FirstSeen, Track, Usage, WRITE_VERBS, Watches, _safe_cpu,
                      by_verb, complete_at, first_requests, latencies, log, own_name, owner_name, proc_cpu_s,
                      proc_mem_mb, quantiles, rayjob_finished, verbs_only, wait_until)
from .plane import (OPERATOR_USER, child_collections, client_for, collection_path, create_all, delete_namespaces,
                    ensure_namespace, expected_children, fine_tunes, kuberay_running, operator_kubeconfig, pid_of,
                    run_async, start_kuberay, start_plane, stop_kuberay, touch_all)

SKIPPABLE = ("handoff", "noop", "restart", "kuberay-default", "kuberay-equal")


# ---- one size ----------------------------------------------------------------------------------------------
def run_size(n: int, args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix=f"llmops-bench-{n}-"))
    log(f"N={n}: starting a fresh plane in {root}")
    plane = start_plane(n, root)
    audit = AuditLog(plane.logs / "audit.log", OPERATOR_USER)
    audit.start()
    kube, cred = client_for(plane)
    watches = Watches(cred.server, cred.token, cred.ca_path)
    plane_pids = {p.name: p.pid for p in plane.processes if p.name in ("kube-apiserver", "etcd")}
    result: dict[str, Any] = {"n": n, "plane_root": str(root), "skipped": sorted(args.skip)}
    try:
        # Our operator starts on the empty plane, as after an install; the restart check measures a start with
        # N in place.
        stop_kuberay(plane)
        config = operator_kubeconfig(plane)
        result.update(llmops_phases(n, plane, kube, watches, audit, plane_pids, args, config))
        if any(f"kuberay-{m}" not in args.skip for m in ("default", "equal")) and result["handoff"] is None:
            # KubeRay never saw our RayJobs (so they carry no finalizer of its): gone first, or its burst would
            # take them on too
            run_async(delete_namespaces(kube, [f"llmops-{n}"], args.timeout))
        result.update(kuberay_bursts(n, plane, kube, watches, audit, plane_pids, args))
    finally:
        watches.close()
        audit.stop.set()
        if args.keep:
            log(f"kept: plane in {root}, KUBECONFIG={plane.kubeconfig}")
        else:
            plane.stop()
            shutil.rmtree(root, ignore_errors=True)
    return result


def llmops_phases(n, plane, kube, watches, audit, plane_pids, args, config: Path) -> dict[str, Any]:
    ns = f"llmops-{n}"
    audit.namespaces[ns] = 0.0
    run_async(ensure_namespace(kube, ns))
    fts = Track(own_name)
    fts.predicates["left_pending"] = lambda o: (o.get("status") or {}).get("phase") not in (None, "Pending")
    fts.predicates["has_status"] = lambda o: bool((o.get("status") or {}).get("phase"))
    jobs = Track(owner_name("FineTune"))
    jobs.predicates["running"] = lambda o: (o.get("status") or {}).get("jobDeploymentStatus") == "Running"
    jobs.predicates["terminal"] = rayjob_finished
    fts.predicates["terminal"] = lambda o: (o.get("status") or {}).get("phase") in ("Succeeded", "Failed")
    clusters = Track(owner_name("RayJob"))
    watches.add(f"/apis/llmops.dev/v1alpha1/namespaces/{ns}/finetunes", fts)
    children = watch_children(watches, ns, also={"RayJob": jobs})
    watches.add(f"/apis/ray.io/v1/namespaces/{ns}/rayclusters", clusters)

    operator = start_operator(plane, args, config)
    op = operator.popen.pid
    out: dict[str, Any] = {}
    try:
        t_up = time.time()
        # /healthz answers before the operator's watches start: wait for them, then for quiet
        wait_until(lambda: any(r[1] in OPERATOR and r[3] == "watch" for r in list(audit.records)), 120,
                   "the operator's watch requests")
        audit.wait_quiet(OPERATOR, 3, 60, since=time.time())
        startup = audit.select(OPERATOR, 0, time.time())
        streams = sum(1 for r in startup if r[3] == "watch")
        out["operator_startup"] = {"requests": len(startup), "by_verb": verbs_only(startup),
                                   "watch_streams": streams, "by_resource": by_verb(startup),
                                   **proc_mem_mb(op), "cpu_s": round(proc_cpu_s(op), 2)}
        profiler = start_profile(op, args, f"burst-{n}")

        # our burst, KubeRay stopped
        log(f"N={n}: llmops burst: {n} FineTunes (KubeRay stopped)")
        usage = Usage({"llmops": op, **plane_pids})
        cpu0 = proc_cpu_s(op)
        t0 = time.time()
        bodies = fine_tunes(n, ns)
        expected = expected_children(bodies)
        created = run_async(create_all(kube, bodies, collection_path))
        wait_until(lambda: len(jobs.added) >= n, args.timeout, f"{n} RayJobs")
        t_all = max(jobs.added.values(), default=t0)
        wait_until(lambda: len(complete_at(expected, children.at)) >= n, args.timeout,
                   f"every child of {n} FineTunes")
        wait_until(lambda: sum("has_status" in fts.firsts[k] for k in created) >= n, args.timeout, "every status")
        t_end = audit.wait_quiet(OPERATOR, args.quiet, args.timeout, since=t_all)
        stop_profile(profiler)
        use = usage.done()
        done = {k: v[1] for k, v in created.items()}
        burst = audit.select(OPERATOR, t0, t_end + 0.001)
        ours = [r for r in burst if r[1] == "llmops"]
        first = first_requests(ours, r"^(ft-\d{5})")
        applied = first_requests(ours, r"^(ft-\d{5})", ("patch", "rayjobs"))
        out["llmops_burst"] = {
            "namespace": ns,
            "create_s": round(max(v[1] for v in created.values()) - t0, 2),
            "creation_to_rayjob_s": quantiles(latencies(done, jobs.added)),
            **all_children(expected, children, done, t0),
            "creation_to_first_status_s": quantiles(latencies(done, {k: f["has_status"] for k, f in
                                                                      fts.firsts.items() if "has_status" in f})),
            # where the time goes: waiting for a reconcile to start, then the reconcile's own requests
            "creation_to_first_request_s": quantiles(latencies(done, first)),
            "first_request_to_rayjob_apply_s": quantiles(latencies(first, applied)),
            "all_rayjobs_after_s": round(t_all - t0, 2) if len(jobs.added) >= n else None,
            "requests": {"total": len(burst), "per_finetune": round(len(burst) / n, 2),
                         "window_s": round(t_end - t0, 1), "by_verb": verbs_only(burst),
                         "by_resource": by_verb(burst)},
            "writes": writes_per_object(burst, n),
            "status_changes_seen_per_finetune": round(sum(fts.status_changes[k] for k in created) / n, 2),
            "cpu_s": round(proc_cpu_s(op) - cpu0, 2),
            **proc_mem_mb(op),
            "machine": use,
            "reconciles": operator_metrics(operator),
        }
        changes_before = sum(fts.status_changes[k] for k in created)

        out["handoff"] = None
        if "handoff" not in args.skip:
            out["handoff"] = handoff(n, plane, audit, operator, plane_pids, fts, jobs, clusters, created, done,
                                     changes_before, args)

        out["noop"] = None
        if "noop" not in args.skip:   # a reconcile that finds nothing to change writes nothing
            wait_at_rest(audit, ns, args)
            log(f"N={n}: no-op reconciles: touching {n} FineTunes")
            before = operator_metrics(operator)
            t_touch = time.time()
            run_async(touch_all(kube, ns, list(created)))
            t_end3 = audit.wait_quiet(OPERATOR, args.quiet, 120, since=time.time())
            touch = audit.select(OPERATOR, t_touch, max(t_end3, time.time()))
            after = operator_metrics(operator)
            out["noop"] = {"touched": n, "reconciles": after["total"] - before["total"],
                           "writes": len([r for r in touch if r[3] in WRITE_VERBS]), "requests": len(touch),
                           "by_resource": by_verb(touch)}

        out["idle"] = idle(n, plane, kube, audit, op, plane_pids, args) if n in args.idle_at else None
        if args.repeat > 1 and n <= REPEAT_MAX_N:   # as the first burst: KubeRay stopped (running since the hand-off)
            running = kuberay_running(plane)
            stop_kuberay(plane)
            out["repeats"] = [repeat_burst(n, i, kube, watches, audit, args) for i in range(1, args.repeat)]
            # gone before KubeRay runs again: its own burst must not take over these RayJobs too
            run_async(delete_namespaces(kube, [r["namespace"] for r in out["repeats"]], args.timeout))
            if running:
                start_kuberay(plane)
        out["operator"] = {**proc_mem_mb(op), "cpu_s_total": round(proc_cpu_s(op), 2),
                           "user_agents": sorted(a for a in audit.agents if a.startswith(("llmops", "kopf"))),
                           "up_s": round(time.time() - t_up, 1)}
    finally:
        operator.stop()
    out["restart"] = None if "restart" in args.skip else restart_check(n, plane, kube, ns, jobs, audit, args,
                                                                        config)
    return out


def watch_children(watches: Watches, ns: str, also: dict[str, Any] | None = None) -> FirstSeen:
    """Watch every kind of child a FineTune has in `ns`; `also` adds a handler to one kind's watch."""
    children = FirstSeen()
    for kind, path in child_collections(ns).items():
        handlers = [children.handler(kind), *([also[kind]] if also and kind in also else [])]
        watches.add(path, lambda t, o, at, hs=handlers: [h(t, o, at) for h in hs])
    return children


def all_children(expected: dict[str, list], children: FirstSeen, done: dict[str, float], t0: float
                 ) -> dict[str, Any]:
    """Creation -> the last of a FineTune's children (every one the builder renders for it) first seen."""
    complete = complete_at(expected, children.at)
    every = round(max(complete.values()) - t0, 2) if complete and len(complete) >= len(expected) else None
    return {"children_per_finetune": sorted({k for c in expected.values() for k, _ in c}),
            "creation_to_all_children_s": quantiles(latencies(done, complete)),
            "all_children_after_s": every}


def handoff(n, plane, audit, operator, plane_pids, fts, jobs, clusters, created, done, changes_before, args
            ) -> dict[str, Any]:
    """KubeRay takes over the RayJobs of our burst; our status follows."""
    log(f"N={n}: hand-off: starting KubeRay with {n} llmops RayJobs waiting")
    op = operator.popen.pid
    profiler = start_profile(op, args, f"handoff-{n}")
    usage = Usage({"llmops": op, **plane_pids})
    cpu0 = proc_cpu_s(op)
    t_kr = time.time()
    start_kuberay(plane)
    usage.pids["kuberay"] = pid_of(plane, "kuberay-operator")
    usage.cpu0["kuberay"] = _safe_cpu(usage.pids["kuberay"])
    wait_until(lambda: sum("left_pending" in fts.firsts[k] for k in created) >= n, args.timeout,
               f"{n} FineTunes to leave Pending")
    wait_until(lambda: sum("terminal" in fts.firsts[k] for k in created) >= n, args.timeout,
               f"{n} FineTunes to finish")
    wait_until(lambda: len(clusters.deleted) >= n, args.timeout, f"KubeRay to delete {n} finished RayClusters")
    t_last = max((fts.firsts[k].get("terminal", 0) for k in created), default=t_kr)
    t_end = audit.wait_quiet((*OPERATOR, "kuberay"), args.quiet, args.timeout, since=t_last)
    stop_profile(profiler)
    use = usage.done()
    records = audit.select(OPERATOR, t_kr, t_end + 0.001)
    left = {k: fts.firsts[k]["left_pending"] for k in created if "left_pending" in fts.firsts[k]}
    running = {k: f["running"] for k, f in jobs.firsts.items() if "running" in f}
    finished = {k: f["terminal"] for k, f in jobs.firsts.items() if "terminal" in f}
    ours_finished = {k: fts.firsts[k]["terminal"] for k in created if "terminal" in fts.firsts[k]}
    status_writes = [r for r in records if r[1] == "llmops" and r[5] == "status"]
    changes = sum(fts.status_changes[k] for k in created) - changes_before
    return {
        "creation_to_phase_left_pending_s": quantiles(latencies(done, left)),
        "kuberay_start_to_phase_left_pending_s": quantiles([t - t_kr for t in left.values()]),
        "rayjob_running_to_phase_left_pending_s": quantiles(latencies(running, left)),
        "rayjob_finished_to_phase_finished_s": quantiles(latencies(finished, ours_finished)),
        "kuberay_start_to_raycluster_s": quantiles([t - t_kr for t in clusters.added.values()]),
        "phases": dict(collections.Counter(json.loads(fts.last_status[k]).get("phase") for k in created)),
        "requests": {"total": len(records), "per_finetune": round(len(records) / n, 2),
                     "window_s": round(t_end - t_kr, 1), "by_verb": verbs_only(records),
                     "by_resource": by_verb(records)},
        "writes": writes_per_object(records, n),
        "status_writes": len(status_writes), "status_changes_seen": changes,
        "cpu_s": round(proc_cpu_s(op) - cpu0, 2), **proc_mem_mb(op), "machine": use,
        "reconciles": operator_metrics(operator),
    }


def idle(n, plane, kube, audit, op, plane_pids, args) -> dict[str, Any]:
    """Every request of the operator process over --idle seconds with everything at rest: the operator renews
    each watch stream every informers.SERVER_TIMEOUT_SECONDS, so the window must span several renewals."""
    wait_at_rest(audit, f"llmops-{n}", args)
    log(f"N={n}: idle: {args.idle:.0f}s with {n} FineTunes at rest")
    kuberay = {"kuberay": pid_of(plane, "kuberay-operator")} if kuberay_running(plane) else {}
    usage = Usage({"llmops": op, **kuberay, **plane_pids})
    cpu0 = proc_cpu_s(op)
    profiler = start_profile(op, args, f"idle-{n}")
    t0 = time.time()
    time.sleep(args.idle)
    t1 = time.time()
    stop_profile(profiler)
    audit.sync(lambda name: run_async(get_absent(kube, name)))
    records = audit.select(OPERATOR, t0, t1)
    records_kr = audit.select(("kuberay",), t0, t1)
    minutes = (t1 - t0) / 60
    use = usage.done()
    return {
        "window_s": round(t1 - t0, 1), "requests": len(records),
        "requests_per_min": round(len(records) / minutes, 3),
        "by_resource": by_verb(records), "by_agent": dict(collections.Counter(r[2] for r in records)),
        "watch_requests": sum(1 for r in records if r[3] == "watch"),
        "cpu_s_per_min": round((proc_cpu_s(op) - cpu0) / minutes, 3),
        "kuberay_requests_per_min": round(len(records_kr) / minutes, 3) if kuberay else None,
        "kuberay_by_resource": by_verb(records_kr),
        "kuberay_cpu_s_per_min": round(use["cpu_s"]["kuberay"] / minutes, 3) if kuberay else None,
        **proc_mem_mb(op), "machine": use,
    }


async def get_absent(kube, name: str) -> None:
    """GET a ConfigMap that does not exist (the audit log's sync marker)."""
    from llmops.kube import ApiError
    try:
        await kube.request("GET", f"/api/v1/namespaces/default/configmaps/{name}")
    except ApiError as e:
        if e.status != 404:
            raise
    finally:
        await kube.close()


def repeat_burst(n, i, kube, watches, audit, args) -> dict[str, Any]:
    """Another burst of N FineTunes into a fresh namespace, the earlier ones at rest: one burst's p99 moves by
    about 30% on a shared 2-core machine, so the targets are judged on the median burst."""
    ns = f"llmops-{n}-r{i}"
    run_async(ensure_namespace(kube, ns))
    jobs = Track(owner_name("FineTune"))
    children = watch_children(watches, ns, also={"RayJob": jobs})
    log(f"N={n}: repeat burst {i}: {n} FineTunes in {ns}")
    t0 = time.time()
    bodies = fine_tunes(n, ns)
    expected = expected_children(bodies)
    created = run_async(create_all(kube, bodies, collection_path))
    wait_until(lambda: len(jobs.added) >= n, args.timeout, f"{n} RayJobs")
    t_all = max(jobs.added.values(), default=t0)
    wait_until(lambda: len(complete_at(expected, children.at)) >= n, args.timeout, f"every child of {n} FineTunes")
    audit.wait_quiet(OPERATOR, args.quiet, args.timeout, since=t_all)
    done = {k: v[1] for k, v in created.items()}
    return {"namespace": ns, "creation_to_rayjob_s": quantiles(latencies(done, jobs.added)),
            **all_children(expected, children, done, t0),
            "all_rayjobs_after_s": round(t_all - t0, 2) if len(jobs.added) >= n else None}


def bursts(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Every burst of ours at this size: the first, then the repeats."""
    return [result["llmops_burst"], *result.get("repeats", [])]


def burst_p99s(result: dict[str, Any], field: str = "creation_to_rayjob_s") -> list[float]:
    """p99 of `field` (creation -> RayJob, or -> every child) in every burst of this size."""
    return [b[field]["p99"] for b in bursts(result)]


def burst_shortfalls(result: dict[str, Any], field: str = "creation_to_rayjob_s", what: str = "RayJobs"
                     ) -> list[str]:
    """The bursts in which fewer than N objects got there (their p99 is over fewer samples than asked for)."""
    n = result["n"]
    return [f"burst {i}: {(b.get(field) or {}).get('count', 0)} of {n} {what}"
            for i, b in enumerate(bursts(result), 1) if (b.get(field) or {}).get("count", 0) < n]


def start_operator(plane: LocalPlane, args, config: Path) -> OperatorProcess:
    env = {"KUBECONFIG": str(config)}
    if args.operator_src:
        env["PYTHONPATH"] = str(Path(args.operator_src).resolve())
    return OperatorProcess(plane, plane.logs / "operator.log", env_extra=env).start()


def restart_check(n, plane, kube, ns, jobs, audit, args, config: Path) -> dict[str, Any]:
    """Restart the operator with the N FineTunes (and their children) in place, then create one more: whether it
    comes back, how soon the new FineTune gets its RayJob, and what it writes for the N at rest."""
    log(f"N={n}: restart with {n} FineTunes at rest, then one new FineTune")
    t_start = time.time()
    operator = start_operator(plane, args, config)
    profiler = start_profile(operator.popen.pid, args, f"restart-{n}")
    try:
        body = finetune("ft-after-restart")
        body["metadata"]["namespace"] = ns
        run_async(create_all(kube, [body], collection_path))
        t_created = time.time()
        ok = wait_until(lambda: "ft-after-restart" in jobs.added, args.restart_timeout,
                        "the RayJob of a FineTune created after the restart")
        stop_profile(profiler)
        t_end = audit.wait_quiet(OPERATOR, args.quiet, 120, since=time.time())
        after = operator_metrics(operator)
        records = audit.select(OPERATOR, t_start, t_end + 0.001)
        # Events are created with generateName (no name in the audit record): counted on their own.
        writes = [r for r in records if r[1] == "llmops" and r[3] in WRITE_VERBS and r[4] != "events"]
        new = [r for r in writes if r[7].startswith("ft-after-restart")]
        return {"handled": ok,
                "creation_to_rayjob_s": round(jobs.added["ft-after-restart"] - t_created, 2) if ok else None,
                "waited_s": round(time.time() - t_created, 1),
                "reconciles": after["total"],
                "writes_for_existing": len(writes) - len(new), "writes_for_new": len(new),
                "events": sum(1 for r in records if r[1] == "llmops" and r[4] == "events"),
                "requests": len(records), "by_resource": by_verb(records)}
    finally:
        stop_profile(profiler)
        operator.stop()


def wait_at_rest(audit: AuditLog, ns: str, args) -> None:
    """Until nobody (operators, garbage collector, scheduler, kwok) has written in the namespace for a while."""
    audit.wait_quiet((*OPERATOR, "kuberay"), args.quiet, args.timeout, since=time.time())
    wait_until(lambda: audit.caught_up - audit.namespaces.get(ns, 0) >= 2 * args.quiet, args.timeout,
               f"no writes in {ns} for {2 * args.quiet:.0f}s")


def writes_per_object(records: list[tuple], n: int) -> dict[str, Any]:
    """Our writes, per object: each child written once (expected_child_writes)."""
    ours = [r for r in records if r[1] == "llmops" and r[3] in WRITE_VERBS]
    child = [r for r in ours if not r[5] and r[4] != "events"]
    per_object = collections.Counter((r[4], r[7]) for r in child)
    return {
        "child_applies": len(child), "child_applies_per_finetune": round(len(child) / n, 2),
        "children_written": len(per_object),
        "children_written_more_than_once": sum(1 for c in per_object.values() if c > 1),
        "max_writes_one_child": max(per_object.values(), default=0),
        "status_writes": sum(1 for r in ours if r[5] == "status"),
        "status_writes_per_finetune": round(sum(1 for r in ours if r[5] == "status") / n, 2),
        "events": sum(1 for r in ours if r[4] == "events"),
        "errors": dict(collections.Counter(r[8] for r in ours if r[8] >= 400)),
    }


def operator_metrics(operator: OperatorProcess) -> dict[str, Any]:
    text = operator.metrics()
    out: dict[str, Any] = {"total": 0}
    for line in text.splitlines():
        if line.startswith("llmops_reconciles_total{"):
            labels, value = line.rsplit(" ", 1)
            out[labels[len("llmops_reconciles_total"):]] = int(float(value))
            out["total"] += int(float(value))
    return out


def start_profile(pid: int, args, tag: str):
    if not args.profile:
        return None
    Path(args.profile).mkdir(parents=True, exist_ok=True)
    out = Path(args.profile) / f"{tag}.txt"
    # The bench extra installs py-spy beside this interpreter, which need not be on PATH.
    beside = Path(sys.executable).parent / "py-spy"
    spy = str(beside) if beside.exists() else shutil.which("py-spy")
    if spy is None:
        raise SystemExit("--profile needs py-spy: .venv/bin/pip install -e '.[bench]'")
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", "50", "--nonblocking",
                             "--format", "raw", "-o", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def stop_profile(proc) -> None:
    if proc is not None:
        import signal
        proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
