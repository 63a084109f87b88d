"""KubeRay's side: N RayJobs as our builder renders them -> RayCluster, at its defaults and at our concurrency."""

from __future__ import annotations

import time
from typing import Any

from llmops.handlers.engine import RECONCILE_SLOTS

from .measure import (Track, Usage, by_verb, first_requests, latencies, log, own_name, owner_name, proc_cpu_s,
                      proc_mem_mb, quantiles, rayjob_finished, verbs_only, wait_until)
from .plane import (collection_path, create_all, delete_namespaces, ensure_namespace, kuberay_inputs,
                    pid_of, run_async, start_kuberay, stop_kuberay)

# Each mode: the result key, the namespace's stem, the flags, and whether the burst waits for every RayJob to
# finish. `--reconcile-concurrency` (default 1) sets the workers of KubeRay's RayJob, RayCluster and RayService
# controllers; "equal" gives them as many as our operator has reconcile slots; everything else (its client's 100
# queries/s, burst 200) stays at its default. The equal burst ends when every RayCluster exists: on this plane a
# job ends only after KubeRay's retries against a dashboard that is not there back off, which takes minutes that
# measure nothing.
MODES = {
    "default": ("kuberay_burst", "kuberay", (), True),
    "equal": ("kuberay_equal_burst", "kuberay-eq", (f"--reconcile-concurrency={RECONCILE_SLOTS}",), False),
}


def kuberay_bursts(n, plane, kube, watches, audit, plane_pids, args) -> dict[str, Any]:
    """Each selected mode's burst from a freshly started KubeRay, our operator stopped; a mode's namespace is
    deleted before the next one starts, so each KubeRay lists the same objects when it starts."""
    out: dict[str, Any] = {}
    previous = None
    for mode, (key, stem, flags, lifecycle) in MODES.items():
        if f"kuberay-{mode}" in args.skip:
            continue
        if previous:   # deleted while the KubeRay that put its finalizer on these RayJobs still runs
            run_async(delete_namespaces(kube, [previous], args.timeout))
        stop_kuberay(plane)
        start_kuberay(plane, flags)
        previous = f"{stem}-{n}"
        follow = lifecycle and args.kuberay_until == "finished"
        out[key] = {"flags": list(flags), "until": "finished" if follow else "clusters",
                    **burst(n, previous, plane, kube, watches, audit, plane_pids, args, follow)}
    return out


def burst(n, ns, plane, kube, watches, audit, plane_pids, args, lifecycle: bool) -> dict[str, Any]:
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
    log(f"N={n}: KubeRay burst in {ns}: {n} RayJobs (our operator is not running)")
    t0 = time.time()
    created = run_async(create_all(kube, jobs, collection_path))
    wait_until(lambda: len(clusters.added) >= n, args.timeout, f"{n} RayClusters")
    t_all = max(clusters.added.values(), default=t0)
    cpu_all = proc_cpu_s(kuberay)
    t_end = t_all
    if lifecycle:
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
        # None unless every RayCluster appeared: a time over fewer than N is no time to every one
        "all_rayclusters_after_s": round(t_all - t0, 2) if len(clusters.added) >= n else None,
        "all_rayjobs_running_after_s": round(max(running.values(), default=t0) - t0, 2),
        "requests_until_all_clusters": {"total": len(to_cluster), "per_rayjob": round(len(to_cluster) / n, 2),
                                        "by_verb": verbs_only(to_cluster), "by_resource": by_verb(to_cluster)},
        "requests_lifecycle": {"total": len(life), "per_rayjob": round(len(life) / n, 2),
                               "window_s": round(t_end - t0, 1), "by_verb": verbs_only(life),
                               "by_resource": by_verb(life)} if lifecycle else None,
        "cpu_s_until_all_clusters": round(cpu_all - cpu0, 2),
        "cpu_s_lifecycle": use["cpu_s"]["kuberay"] if lifecycle else None,
        **{f"kuberay_{k}": v for k, v in proc_mem_mb(kuberay).items()},
        "user_agents": sorted(a for a in audit.agents if a.startswith(("kuberay", "ray-operator"))),
        "machine": use,
    }
