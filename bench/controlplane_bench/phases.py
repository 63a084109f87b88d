"""One size: KubeRay's burst, then ours (burst, hand-off, no-op reconciles, rest, restart), on one plane."""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from integration.harness import OperatorProcess
from llmops.dev.plane import LocalPlane
from manifests import finetune

from .measure import (AuditLog, REPEAT_MAX_N, Track, Usage, WATCH_TIMEOUT_S, WRITE_VERBS, Watches, _safe_cpu,
                      by_verb, latencies, log, own_name, owner_name, proc_cpu_s, proc_mem_mb, quantiles,
                      rayjob_finished, verbs_only, wait_until)
from .plane import (client_for, collection_path, create_all, delete_namespaces, ensure_namespace, fine_tunes,
                    kuberay_inputs, pid_of, run_async, start_plane, stop_kuberay, touch_all)


# ---- one size ----------------------------------------------------------------------------------------------
def run_size(n: int, args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix=f"llmops-bench-{n}-"))
    log(f"N={n}: starting a fresh plane in {root}")
    plane = start_plane(n, root)
    audit = AuditLog(plane.logs / "audit.log")
    audit.start()
    kube, cred = client_for(plane)
    watches = Watches(cred.server, cred.token, cred.ca_path)
    plane_pids = {p.name: p.pid for p in plane.processes if p.name in ("kube-apiserver", "etcd")}
    result: dict[str, Any] = {"n": n, "plane_root": str(root)}
    try:
        # Our operator starts on the empty plane, as after an install: see restart_check for why it must.
        stop_kuberay(plane)
        result.update(llmops_phases(n, plane, kube, watches, audit, plane_pids, args))
        if n not in args.ours_only:
            stop_kuberay(plane)      # a fresh KubeRay process for its own burst (RSS and CPU from zero)
            plane.start_kuberay()
            plane.save_state()
            result["kuberay_burst"] = kuberay_burst(n, plane, kube, watches, audit, plane_pids, args)
    finally:
        watches.close()
        audit.stop.set()
        if args.keep:
            log(f"kept: plane in {root}, KUBECONFIG={plane.kubeconfig}")
        else:
            plane.stop()
            shutil.rmtree(root, ignore_errors=True)
    return result


def kuberay_burst(n, plane, kube, watches, audit, plane_pids, args) -> dict[str, Any]:
    ns = f"kuberay-{n}"
    run_async(ensure_namespace(kube, ns))
    others, jobs = kuberay_inputs(n, ns)
    log(f"N={n}: creating the {len(others)} non-Ray children KubeRay's pods refer to (untimed)")
    run_async(create_all(kube, others, collection_path))
    jobs_seen = Track(own_name)
    jobs_seen.predicates["running"] = lambda o: (o.get("status") or {}).get("jobDeploymentStatus") == "Running"
    jobs_seen.predicates["terminal"] = rayjob_finished
    clusters = Track(owner_name("RayJob"))
    watches.add(f"/apis/ray.io/v1/namespaces/{ns}/rayjobs", jobs_seen)
    watches.add(f"/apis/ray.io/v1/namespaces/{ns}/rayclusters", clusters)
    audit.wait_quiet(("kuberay",), 3, 60)
    kuberay = pid_of(plane, "kuberay-operator")
    usage = Usage({"kuberay": kuberay, **plane_pids})
    cpu0 = proc_cpu_s(kuberay)
    log(f"N={n}: KubeRay burst: {n} RayJobs (our operator is not running)")
    t0 = time.time()
    created = run_async(create_all(kube, jobs, collection_path))
    wait_until(lambda: len(clusters.added) >= n, args.timeout, f"{n} RayClusters")
    t_all = max(clusters.added.values(), default=t0)
    cpu_all = proc_cpu_s(kuberay)
    wait_until(lambda: sum("terminal" in jobs_seen.firsts[k] for k in created) >= n, args.timeout,
               f"{n} RayJobs to finish")
    t_end = audit.wait_quiet(("kuberay",), args.quiet, args.timeout, since=t_all)
    use = usage.done()
    done = {k: v[1] for k, v in created.items()}
    life = audit.select(("kuberay",), t0, t_end + 0.001)
    to_cluster = audit.select(("kuberay",), t0, t_all + 0.001)
    first = first_requests(to_cluster, r"^(ft-\d{5}-ft)$", ("update", "rayjobs"))
    running = {k: f["running"] for k, f in jobs_seen.firsts.items() if "running" in f}
    return {
        "namespace": ns,
        "create_s": round(max(v[1] for v in created.values()) - t0, 2),
        "creation_to_raycluster_s": quantiles(latencies(done, clusters.added)),
        "creation_to_rayjob_running_s": quantiles(latencies(done, running)),
        "creation_to_first_request_s": quantiles(latencies(done, first)),
        "first_request_to_raycluster_s": quantiles(latencies(first, clusters.added)),
        "all_rayclusters_after_s": round(t_all - t0, 2),
        "all_rayjobs_running_after_s": round(max(running.values(), default=t0) - t0, 2),
        "requests_until_all_clusters": {"total": len(to_cluster), "per_rayjob": round(len(to_cluster) / n, 2),
                                        "by_verb": verbs_only(to_cluster), "by_resource": by_verb(to_cluster)},
        "requests_lifecycle": {"total": len(life), "per_rayjob": round(len(life) / n, 2),
                               "window_s": round(t_end - t0, 1), "by_verb": verbs_only(life),
                               "by_resource": by_verb(life)},
        "cpu_s_until_all_clusters": round(cpu_all - cpu0, 2),
        "cpu_s_lifecycle": use["cpu_s"]["kuberay"],
        **{f"kuberay_{k}": v for k, v in proc_mem_mb(kuberay).items()},
        "user_agents": sorted(a for a in audit.agents if a.startswith(("kuberay", "ray-operator"))),
        "machine": use,
    }


def llmops_phases(n, plane, kube, watches, audit, plane_pids, args) -> dict[str, Any]:
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
    watches.add(f"/apis/ray.io/v1/namespaces/{ns}/rayjobs", jobs)
    watches.add(f"/apis/ray.io/v1/namespaces/{ns}/rayclusters", clusters)

    operator = start_operator(plane, args)
    op = operator.popen.pid
    out: dict[str, Any] = {}
    try:
        t_up = time.time()
        # /healthz answers before kopf's watchers start: wait for them, then for quiet
        wait_until(lambda: any(r[1] == "kopf" and r[3] == "watch" for r in list(audit.records)), 120,
                   "kopf's watch requests")
        audit.wait_quiet(("llmops", "kopf"), 3, 60, since=time.time())
        startup = audit.select(("llmops", "kopf"), 0, time.time())
        streams = sum(1 for r in startup if r[3] == "watch")
        out["operator_startup"] = {"requests": len(startup), "by_verb": verbs_only(startup),
                                   "watch_streams": streams, "by_resource": by_verb(startup),
                                   **proc_mem_mb(op), "cpu_s": round(proc_cpu_s(op), 2)}
        profiler = start_profile(op, args, f"burst-{n}")

        # phase 2: our burst, KubeRay stopped
        log(f"N={n}: llmops burst: {n} FineTunes (KubeRay stopped)")
        usage = Usage({"llmops": op, **plane_pids})
        cpu0 = proc_cpu_s(op)
        t0 = time.time()
        created = run_async(create_all(kube, fine_tunes(n, ns), collection_path))
        wait_until(lambda: len(jobs.added) >= n, args.timeout, f"{n} RayJobs")
        t_all = max(jobs.added.values(), default=t0)
        wait_until(lambda: sum("has_status" in fts.firsts[k] for k in created) >= n, args.timeout, "every status")
        t_end = audit.wait_quiet(("llmops", "kopf"), args.quiet, args.timeout, since=t_all)
        stop_profile(profiler)
        use = usage.done()
        done = {k: v[1] for k, v in created.items()}
        burst = audit.select(("llmops", "kopf"), t0, t_end + 0.001)
        ours = [r for r in burst if r[1] == "llmops"]
        first = first_requests(ours, r"^(ft-\d{5})")
        applied = first_requests(ours, r"^(ft-\d{5})", ("patch", "rayjobs"))
        out["llmops_burst"] = {
            "namespace": ns,
            "create_s": round(max(v[1] for v in created.values()) - t0, 2),
            "creation_to_rayjob_s": quantiles(latencies(done, jobs.added)),
            "creation_to_first_status_s": quantiles(latencies(done, {k: f["has_status"] for k, f in
                                                                      fts.firsts.items() if "has_status" in f})),
            # where the time goes: waiting for a reconcile to start, then the reconcile's own requests
            "creation_to_first_request_s": quantiles(latencies(done, first)),
            "first_request_to_rayjob_apply_s": quantiles(latencies(first, applied)),
            "all_rayjobs_after_s": round(t_all - t0, 2),
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
        if n not in args.ours_only:
            # phase 3: KubeRay takes over the RayJobs; our status follows
            log(f"N={n}: hand-off: starting KubeRay with {n} llmops RayJobs waiting")
            profiler = start_profile(op, args, f"handoff-{n}")
            usage = Usage({"llmops": op, **plane_pids})
            cpu0 = proc_cpu_s(op)
            t_kr = time.time()
            plane.start_kuberay()
            plane.save_state()
            usage.pids["kuberay"] = pid_of(plane, "kuberay-operator")
            usage.cpu0["kuberay"] = _safe_cpu(usage.pids["kuberay"])
            wait_until(lambda: sum("left_pending" in fts.firsts[k] for k in created) >= n, args.timeout,
                       f"{n} FineTunes to leave Pending")
            wait_until(lambda: sum("terminal" in fts.firsts[k] for k in created) >= n, args.timeout,
                       f"{n} FineTunes to finish")
            wait_until(lambda: len(clusters.deleted) >= n, args.timeout, f"KubeRay to delete {n} finished RayClusters")
            t_last = max((fts.firsts[k].get("terminal", 0) for k in created), default=t_kr)
            t_end2 = audit.wait_quiet(("llmops", "kopf", "kuberay"), args.quiet, args.timeout, since=t_last)
            stop_profile(profiler)
            use = usage.done()
            handoff = audit.select(("llmops", "kopf"), t_kr, t_end2 + 0.001)
            left = {k: fts.firsts[k]["left_pending"] for k in created if "left_pending" in fts.firsts[k]}
            running = {k: f["running"] for k, f in jobs.firsts.items() if "running" in f}
            finished = {k: f["terminal"] for k, f in jobs.firsts.items() if "terminal" in f}
            ours_finished = {k: fts.firsts[k]["terminal"] for k in created if "terminal" in fts.firsts[k]}
            status_writes = [r for r in handoff if r[1] == "llmops" and r[5] == "status"]
            changes = sum(fts.status_changes[k] for k in created) - changes_before
            out["handoff"] = {
                "creation_to_phase_left_pending_s": quantiles(latencies(done, left)),
                "kuberay_start_to_phase_left_pending_s": quantiles([t - t_kr for t in left.values()]),
                "rayjob_running_to_phase_left_pending_s": quantiles(latencies(running, left)),
                "rayjob_finished_to_phase_finished_s": quantiles(latencies(finished, ours_finished)),
                "kuberay_start_to_raycluster_s": quantiles([t - t_kr for t in clusters.added.values()]),
                "phases": dict(collections.Counter(json.loads(fts.last_status[k]).get("phase") for k in created)),
                "requests": {"total": len(handoff), "per_finetune": round(len(handoff) / n, 2),
                             "window_s": round(t_end2 - t_kr, 1), "by_verb": verbs_only(handoff),
                             "by_resource": by_verb(handoff)},
                "writes": writes_per_object(handoff, n),
                "status_writes": len(status_writes), "status_changes_seen": changes,
                "cpu_s": round(proc_cpu_s(op) - cpu0, 2), **proc_mem_mb(op), "machine": use,
                "reconciles": operator_metrics(operator),
            }

        # a reconcile that finds nothing to change writes nothing
        wait_at_rest(audit, ns, args)
        log(f"N={n}: no-op reconciles: touching {n} FineTunes")
        before = operator_metrics(operator)
        t_touch = time.time()
        run_async(touch_all(kube, ns, list(created)))
        t_end3 = audit.wait_quiet(("llmops", "kopf"), args.quiet, 120, since=time.time())
        touch = audit.select(("llmops", "kopf"), t_touch, max(t_end3, time.time()))
        after = operator_metrics(operator)
        out["noop"] = {"touched": n, "reconciles": after["total"] - before["total"],
                       "writes": len([r for r in touch if r[3] in WRITE_VERBS]), "requests": len(touch),
                       "by_resource": by_verb(touch)}

        # phase 4: steady state
        wait_at_rest(audit, ns, args)
        log(f"N={n}: steady state: {args.steady:.0f}s with {n} FineTunes at rest")
        kuberay = {} if n in args.ours_only else {"kuberay": pid_of(plane, "kuberay-operator")}
        usage = Usage({"llmops": op, **kuberay, **plane_pids})
        cpu0 = proc_cpu_s(op)
        profiler = start_profile(op, args, f"steady-{n}")
        t_s = time.time()
        time.sleep(args.steady)
        t_s1 = time.time()
        stop_profile(profiler)
        time.sleep(1.0)  # let the audit log catch up
        idle = audit.select(("llmops", "kopf"), t_s, t_s1)
        idle_kr = audit.select(("kuberay",), t_s, t_s1)
        minutes = (t_s1 - t_s) / 60
        out["steady"] = {
            "window_s": round(t_s1 - t_s, 1), "requests": len(idle),
            "requests_per_min": round(len(idle) / minutes, 2),
            "requests_per_min_per_100": round(len(idle) / minutes / (n / 100), 3),
            "by_resource": by_verb(idle),
            "cpu_s_per_min": round((proc_cpu_s(op) - cpu0) / minutes, 3),
            "kuberay_requests_per_min": round(len(idle_kr) / minutes, 2),
            "kuberay_by_resource": by_verb(idle_kr),
            "kuberay_cpu_s_per_min": round(usage.done()["cpu_s"]["kuberay"] / minutes, 3) if kuberay else None,
            "watch_renewals_per_min": round(streams * 60 / WATCH_TIMEOUT_S, 2),
            "watch_renewals_per_min_per_100": round(streams * 60 / WATCH_TIMEOUT_S / (n / 100), 3),
            **proc_mem_mb(op), "machine": usage.done(),
        }
        if args.repeat > 1 and n <= REPEAT_MAX_N:   # as the first burst: KubeRay stopped (running since the hand-off)
            running = any(p.name == "kuberay-operator" for p in plane.processes)
            if running:
                stop_kuberay(plane)
            out["repeats"] = [repeat_burst(n, i, kube, watches, audit, args) for i in range(1, args.repeat)]
            # gone before KubeRay runs again: its own burst must not take over these RayJobs too
            run_async(delete_namespaces(kube, [r["namespace"] for r in out["repeats"]], args.timeout))
            if running:
                plane.start_kuberay()
        out["operator"] = {**proc_mem_mb(op), "cpu_s_total": round(proc_cpu_s(op), 2),
                           "user_agents": sorted(a for a in audit.agents if a.startswith(("llmops", "kopf"))),
                           "up_s": round(time.time() - t_up, 1)}
    finally:
        operator.stop()
    out["restart"] = restart_check(n, plane, kube, ns, jobs, audit, args)
    return out


def repeat_burst(n, i, kube, watches, audit, args) -> dict[str, Any]:
    """Another burst of N FineTunes into a fresh namespace, the earlier ones at rest: one burst's p99 moves by
    about 30% on a shared 2-core machine, so the target is judged on the median burst."""
    ns = f"llmops-{n}-r{i}"
    run_async(ensure_namespace(kube, ns))
    jobs = Track(owner_name("FineTune"))
    watches.add(f"/apis/ray.io/v1/namespaces/{ns}/rayjobs", jobs)
    log(f"N={n}: repeat burst {i}: {n} FineTunes in {ns}")
    t0 = time.time()
    created = run_async(create_all(kube, fine_tunes(n, ns), collection_path))
    wait_until(lambda: len(jobs.added) >= n, args.timeout, f"{n} RayJobs")
    t_all = max(jobs.added.values(), default=t0)
    audit.wait_quiet(("llmops", "kopf"), args.quiet, args.timeout, since=t_all)
    return {"namespace": ns, "creation_to_rayjob_s": quantiles(latencies({k: v[1] for k, v in created.items()},
                                                                           jobs.added)),
            "all_rayjobs_after_s": round(t_all - t0, 2)}


def burst_p99s(result: dict[str, Any]) -> list[float]:
    """p99 creation -> RayJob of every burst of this size: the first, then the repeats."""
    return [b["creation_to_rayjob_s"]["p99"] for b in [result["llmops_burst"], *result.get("repeats", [])]]


def start_operator(plane: LocalPlane, args) -> OperatorProcess:
    env = {"PYTHONPATH": str(Path(args.operator_src).resolve())} if args.operator_src else None
    return OperatorProcess(plane, plane.logs / "operator.log", env_extra=env).start()


def restart_check(n, plane, kube, ns, jobs, audit, args) -> dict[str, Any]:
    """Restart the operator with the N FineTunes (and their children) in place, then create one more.

    kopf runs no handler until every watched kind's initial listing is indexed, and spawns at most
    settings.queueing.worker_limit object workers per watched kind; each listed object's worker waits for
    that readiness. With more objects of one kind than the limit (pods or ConfigMaps count cluster-wide:
    kopf filters labels on the client side) the workers that could start wait for the ones that cannot.
    This check measures whether the operator comes back and what it writes when it does."""
    log(f"N={n}: restart with {n} FineTunes at rest, then one new FineTune")
    t_start = time.time()
    operator = start_operator(plane, args)
    try:
        body = finetune("ft-after-restart")
        body["metadata"]["namespace"] = ns
        run_async(create_all(kube, [body], collection_path))
        t_created = time.time()
        ok = wait_until(lambda: "ft-after-restart" in jobs.added, args.restart_timeout,
                        "the RayJob of a FineTune created after the restart")
        time.sleep(2)
        t_end = audit.wait_quiet(("llmops", "kopf"), args.quiet, 120, since=time.time())
        after = operator_metrics(operator)
        records = audit.select(("llmops", "kopf"), t_start, t_end + 0.001)
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
        operator.stop()


def wait_at_rest(audit: AuditLog, ns: str, args) -> None:
    """Until nobody (operators, garbage collector, scheduler, kwok) has written in the namespace for a while."""
    audit.wait_quiet(("llmops", "kopf", "kuberay"), args.quiet, args.timeout, since=time.time())
    wait_until(lambda: audit.caught_up - audit.namespaces.get(ns, 0) >= 2 * args.quiet, args.timeout,
               f"no writes in {ns} for {2 * args.quiet:.0f}s")


def first_requests(records: list[tuple], pattern: str, verb_resource: tuple[str, str] | None = None
                   ) -> dict[str, float]:
    """FineTune name -> when the first request about it (or the first `verb resource` about it) arrived."""
    import re
    name_of = re.compile(pattern)
    out: dict[str, float] = {}
    for r in records:
        m = name_of.match(r[7])
        if m and (verb_resource is None or (r[3], r[4]) == verb_resource):
            out.setdefault(m.group(1), r[0])
    return out


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
    return subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--rate", "50", "--nonblocking",
                             "--format", "raw", "-o", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def stop_profile(proc) -> None:
    if proc is not None:
        import signal
        proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
