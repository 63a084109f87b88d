"""Verdicts against the issue's targets, and the tables the bench prints."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
from typing import Any

from llmops.handlers.engine import RECONCILE_SLOTS

from . import REPO
from .measure import TARGETS
from .phases import burst_p99s, burst_shortfalls, bursts
from .plane import expected_child_writes


# ---- verdicts ----------------------------------------------------------------------------------------------
def verdict(key: str, target: str, value: Any, passed: bool) -> dict[str, Any]:
    return {"key": key, "target": target, "value": value, "pass": bool(passed)}


def at_most(key: str, target: str, value: float | None, limit: float) -> dict[str, Any]:
    """A value not measured (None) misses its target."""
    return verdict(key, target, value, value is not None and value <= limit)


# The N=100 p99s, of creation -> RayJob and of creation -> every child: the field, what its count counts, the
# verdict's key, its limit in TARGETS, and how the target names it.
P99S = {"rayjob": ("creation_to_rayjob_s", "RayJobs", "rayjob_p99_s_n100", "p99_rayjob_n100_s", "RayJob"),
        "every child": ("creation_to_all_children_s", "FineTunes with every child", "all_children_p99_s_n100",
                        "all_children_p99_s_n100", "every child of a FineTune")}


def median_p99(r: dict[str, Any], of: str = "rayjob") -> float | None:
    """The median of the bursts' p99s; None when any burst is short of N."""
    field, what, *_ = P99S[of]
    return None if burst_shortfalls(r, field, what) else statistics.median(burst_p99s(r, field))


def p99_verdict(r: dict[str, Any], of: str = "rayjob") -> dict[str, Any]:
    """An N=100 p99 target, judged on the median burst. A burst in which fewer than N objects got there has no
    p99 of N: its figure would come from the fastest objects only, so the target fails, naming the shortfall."""
    field, what, key, limit, label = P99S[of]
    target = f"p99 creation -> {label} <= 1 s at N={r['n']}"
    short = burst_shortfalls(r, field, what)
    if short:
        return verdict(key, target, f"no p99 over N: {'; '.join(short)}", False)
    p99s = burst_p99s(r, field)
    return at_most(key, target + (f" (median of {len(p99s)} bursts: {', '.join(f'{v:.2f}' for v in p99s)})"
                                  if len(p99s) > 1 else ""), statistics.median(p99s), TARGETS[limit])


def ratio_of(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def headlines(results: list[dict]) -> dict[str, Any]:
    """The figures the targets are judged on, each under its key; None where the run did not measure it."""
    by_n = {r["n"]: r for r in results}
    n100, n1000, n5000 = by_n.get(100), by_n.get(1000), by_n.get(5000)
    ours_1000 = n1000["llmops_burst"].get("all_children_after_s") if n1000 else None
    kuberay = lambda r, key: (r.get(key) or {}).get("all_rayclusters_after_s") if r else None  # noqa: E731
    idle_1000 = (n1000 or {}).get("idle")
    restart = (n5000 or {}).get("restart")
    return {
        "all_children_p99_s_n100": median_p99(n100, "every child") if n100 else None,
        "rayjob_p99_s_n100": median_p99(n100) if n100 else None,
        "all_children_s_n1000": ours_1000,
        "kuberay_all_rayclusters_s_n1000": kuberay(n1000, "kuberay_burst"),
        "kuberay_equal_all_rayclusters_s_n1000": kuberay(n1000, "kuberay_equal_burst"),
        "ratio_all_children_n1000_default": ratio_of(ours_1000, kuberay(n1000, "kuberay_burst")),
        "ratio_all_children_n1000_equal_concurrency": ratio_of(ours_1000, kuberay(n1000, "kuberay_equal_burst")),
        "idle_requests_per_min_n1000": idle_1000["requests_per_min"] if idle_1000 else None,
        "idle_window_s_n1000": idle_1000["window_s"] if idle_1000 else None,
        "restart_new_rayjob_s_n5000": restart["creation_to_rayjob_s"] if restart else None,
        "rss_mb_ours_n5000": round(n5000["operator"]["peak_rss_mb"], 1) if n5000 else None,
        "rss_mb_kuberay_n5000": round(n5000["kuberay_burst"]["kuberay_peak_rss_mb"], 1)
        if n5000 and n5000.get("kuberay_burst") else None,
    }


def kuberay_until(results: list[dict]) -> str:
    """How far KubeRay's default burst at N=5000 was followed, when not to every job's end."""
    burst = next((r.get("kuberay_burst") or {} for r in results if r["n"] == 5000), {})
    return ", until every RayCluster existed" if burst.get("until") == "clusters" else ""


def verdicts(results: list[dict]) -> list[dict[str, Any]]:
    """Every target of the issue, measured or not (a figure the run did not measure is a miss), then the checks
    each size's phases make."""
    h = headlines(results)
    window_ok = (h["idle_window_s_n1000"] or 0) >= TARGETS["idle_window_min_s"]
    idle = h["idle_requests_per_min_n1000"]
    ours_rss, kuberay_rss = h["rss_mb_ours_n5000"], h["rss_mb_kuberay_n5000"]
    n100 = next((r for r in results if r["n"] == 100), None)
    out = [p99_verdict(n100, of) if n100 else verdict(key, f"p99 creation -> {label} <= 1 s at N=100", None, False)
           for of, (_, _, key, _, label) in P99S.items()]
    out += [
        at_most("ratio_all_children_n1000_default", "N=1000: every child of every FineTune <= 0.5 x KubeRay's "
                "every RayCluster of 1000 RayJobs, KubeRay at its defaults",
                h["ratio_all_children_n1000_default"], TARGETS["ratio_all_children_n1000"]),
        at_most("ratio_all_children_n1000_equal_concurrency", "N=1000: the same, KubeRay at "
                f"--reconcile-concurrency={RECONCILE_SLOTS} (our reconcile slots)",
                h["ratio_all_children_n1000_equal_concurrency"], TARGETS["ratio_all_children_n1000"]),
        verdict("idle_requests_per_min_n1000", "N=1000 at rest: <= 1 API request/min in total from the operator "
                f"process (watch renewals included) over >= {TARGETS['idle_window_min_s'] / 60:.0f} min"
                + (f" (window {h['idle_window_s_n1000']:.0f} s)" if h["idle_window_s_n1000"] else ""),
                idle, idle is not None and window_ok and idle <= TARGETS["idle_requests_per_min_n1000"]),
        at_most("restart_new_rayjob_s_n5000", "restart with 5000 at rest: a new FineTune's RayJob <= 3 s after "
                "its creation", h["restart_new_rayjob_s_n5000"], TARGETS["restart_new_rayjob_s_n5000"]),
        verdict("rss_mb_ours_n5000", "N=5000: our peak RSS <= the KubeRay operator's (default settings, 5000 "
                f"RayJobs, same run{kuberay_until(results)}: {kuberay_rss} MB)", ours_rss,
                ours_rss is not None and kuberay_rss is not None
                and ours_rss <= TARGETS["rss_ratio_n5000"] * kuberay_rss),
    ]
    largest = max(results, key=lambda r: r["n"])
    out.append(at_most("peak_rss_mb", f"peak RSS <= 250 MB at the largest N ({largest['n']})",
                       round(largest["operator"]["peak_rss_mb"], 1), TARGETS["peak_rss_mb"]))
    for r in results:
        out += size_verdicts(r)
    return out


def size_verdicts(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The checks of one size's phases (those that ran)."""
    n, w = r["n"], r["llmops_burst"]["writes"]
    h = r.get("handoff") or {"writes": {"child_applies": 0}, "status_writes": 0, "status_changes_seen": 0}
    expected = expected_child_writes(n)
    once = w["children_written_more_than_once"] == 0 and w["child_applies"] == expected \
        and h["writes"]["child_applies"] == 0
    seen = r["llmops_burst"]["status_changes_seen_per_finetune"] * n
    out = [
        verdict(f"one_write_per_child_n{n}", f"N={n}: one write per child ({expected} for {n} FineTunes: "
                f"{(expected - 1) // n} each + the shared payload ConfigMap)",
                f"{(w['child_applies'] + h['writes']['child_applies']) / n:.2f}/FineTune, "
                f"{w['children_written_more_than_once']} children written twice+", once),
        verdict(f"status_writes_n{n}", f"N={n}: status writes only on real changes",
                f"burst {w['status_writes']} writes / {seen:.0f} changes; hand-off {h['status_writes']} writes / "
                f"{h['status_changes_seen']} changes",
                w["status_writes"] <= seen and h["status_writes"] <= h["status_changes_seen"]),
    ]
    if r.get("noop"):
        out.append(verdict(f"noop_writes_n{n}", f"N={n}: zero writes for a reconcile that changes nothing",
                           f"{r['noop']['writes']} writes in {r['noop']['reconciles']} reconciles",
                           r["noop"]["writes"] == 0 and r["noop"]["reconciles"] >= n))
    if r.get("idle") and n != 1000:
        i = r["idle"]
        out.append(verdict(f"idle_requests_per_min_n{n}", f"N={n} at rest: <= 1 API request/min in total over >= "
                           f"{TARGETS['idle_window_min_s'] / 60:.0f} min (window {i['window_s']:.0f} s)",
                           i["requests_per_min"], i["window_s"] >= TARGETS["idle_window_min_s"]
                           and i["requests_per_min"] <= TARGETS["idle_requests_per_min_n1000"]))
    if r.get("restart"):
        rs = r["restart"]
        out.append(verdict(f"restart_n{n}", f"N={n}: restart with N at rest: handles a new FineTune, writes "
                           "nothing for the others",
                           f"RayJob after {rs['creation_to_rayjob_s']} s, {rs['reconciles']} reconciles, "
                           f"{rs['writes_for_existing']} writes for existing" if rs["handled"] else
                           f"not handled after {rs['waited_s']} s ({rs['reconciles']} reconciles)",
                           rs["handled"] and rs["writes_for_existing"] == 0))
    return out


# ---- tables ------------------------------------------------------------------------------------------------
def fmt_q(q: dict | None) -> str:
    if not q or q.get("p50") is None:
        return "n/a"
    return f"{q['p50']:.2f} / {q['p99']:.2f} / {q['max']:.2f}"


def fmt(v: float | None, digits: int = 1) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "n/a"


def size_table(r: dict[str, Any]) -> list[str]:
    """Ours beside each KubeRay burst that ran, then one line per phase of ours."""
    b = r["llmops_burst"]
    krs = [(name, r[key]) for name, key in (("KubeRay default", "kuberay_burst"),
                                            ("KubeRay equal conc.", "kuberay_equal_burst")) if r.get(key)]
    rows = [("", "llmops: FineTune -> children", *(f"{name}: RayJob -> RayCluster" for name, _ in krs))]
    rows += [
        ("creation -> child p50/p99/max s", f"RayJob {fmt_q(b['creation_to_rayjob_s'])}",
         *(fmt_q(k["creation_to_raycluster_s"]) for _, k in krs)),
        ("creation -> every child p50/p99/max s", fmt_q(b.get("creation_to_all_children_s")), *("" for _ in krs)),
        ("every child of every resource after s", f"{fmt(b.get('all_children_after_s'))} (RayJobs "
         f"{fmt(b['all_rayjobs_after_s'])})", *(f"{fmt(k['all_rayclusters_after_s'])} (ours/KubeRay "
                                                f"{ratio(b.get('all_children_after_s'), k['all_rayclusters_after_s'])})"
                                                for _, k in krs)),
        ("API requests/resource, first step", f"{b['requests']['per_finetune']:.2f}",
         *(f"{k['requests_until_all_clusters']['per_rayjob']:.2f}" for _, k in krs)),
        ("CPU ms/resource, first step", f"{1000 * b['cpu_s'] / r['n']:.1f}",
         *(f"{1000 * k['cpu_s_until_all_clusters'] / r['n']:.1f}" for _, k in krs)),
        ("peak RSS MB (our run / KubeRay's burst)", f"{r['operator']['peak_rss_mb']:.0f}",
         *(f"{k['kuberay_peak_rss_mb']:.0f}" for _, k in krs)),
        ("machine busy / others' share", f"{b['machine']['machine_busy_pct']:.0f}% / "
         f"{b['machine']['others_busy_pct']:.0f}%",
         *(f"{k['machine']['machine_busy_pct']:.0f}% / {k['machine']['others_busy_pct']:.0f}%" for _, k in krs)),
    ]
    if r.get("handoff"):
        life = (b["requests"]["total"] + r["handoff"]["requests"]["total"]) / r["n"]
        rows.append(("API requests/resource, whole life", f"{life:.2f}",
                     *(fmt((k["requests_lifecycle"] or {}).get("per_rayjob"), 2) for _, k in krs)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"N = {r['n']}" + (f" (skipped: {', '.join(r['skipped'])})" if r.get("skipped") else "")
             + (f" on {r['machine']}" if r.get("machine") else "")]
    lines += ["  " + "  ".join(c.ljust(wd) for c, wd in zip(row, widths)) for row in rows]
    w = b["writes"]
    lines += [
        f"  children of a FineTune: {', '.join(b.get('children_per_finetune', []))}",
        f"  where the time goes: ours creation -> first request {fmt_q(b['creation_to_first_request_s'])} s, "
        f"first request -> RayJob applied {fmt_q(b['first_request_to_rayjob_apply_s'])} s",
        f"  our writes per FineTune (burst): {w['child_applies_per_finetune']:.2f} child applies "
        f"({w['children_written_more_than_once']} of {w['children_written']} children written more than once, "
        f"max {w['max_writes_one_child']}), {w['status_writes_per_finetune']:.2f} status writes "
        f"for {b['status_changes_seen_per_finetune']:.2f} status changes seen, {w['events'] / r['n']:.2f} events",
    ]
    if r.get("handoff"):
        h = r["handoff"]
        lines.append(
            f"  hand-off (KubeRay started after our burst): KubeRay start -> phase leaves Pending "
            f"{fmt_q(h['kuberay_start_to_phase_left_pending_s'])} s; RayJob Running -> FineTune Running "
            f"{fmt_q(h['rayjob_running_to_phase_left_pending_s'])} s; RayJob Failed -> FineTune Failed "
            f"{fmt_q(h['rayjob_finished_to_phase_finished_s'])} s; {h['status_writes']} status writes for "
            f"{h['status_changes_seen']} status changes; {h['writes']['child_applies']} child re-applies; "
            f"final phases {h['phases']}")
    lines += repeat_lines(r)
    if r.get("noop"):
        lines.append(f"  no-op: {r['noop']['touched']} touches -> {r['noop']['reconciles']} reconciles, "
                     f"{r['noop']['writes']} writes, {r['noop']['requests']} requests")
    if r.get("restart"):
        rs = r["restart"]
        lines.append(f"  restart with {r['n']} at rest: " + (
            f"new FineTune's RayJob after {rs['creation_to_rayjob_s']} s; {rs['reconciles']} reconciles, "
            f"{rs['writes_for_existing']} writes for the existing ones" if rs["handled"] else
            f"NOT HANDLED: no RayJob {rs['waited_s']} s after creating a FineTune; {rs['reconciles']} reconciles"))
    if r.get("idle"):
        i = r["idle"]
        lines.append(
            f"  idle {i['window_s']:.0f}s: {i['requests']} requests from the operator process "
            f"({i['requests_per_min']:.2f}/min; {i['watch_requests']} of them watch renewals) {i['by_resource']}, "
            f"{i['cpu_s_per_min']:.3f} CPU s/min, RSS {i['rss_mb']:.0f} MB; KubeRay "
            f"{fmt(i['kuberay_requests_per_min'], 2)} requests/min, {fmt(i['kuberay_cpu_s_per_min'], 3)} CPU s/min")
    return [*lines, ""]


def repeat_lines(r: dict[str, Any]) -> list[str]:
    if not r.get("repeats"):
        return []
    each = "; ".join(f"RayJob {fmt_q(b['creation_to_rayjob_s'])}, every child "
                     f"{fmt_q(b.get('creation_to_all_children_s'))}" for b in r["repeats"])
    short = "; ".join(burst_shortfalls(r) + burst_shortfalls(r, *P99S["every child"][:2]))
    return [f"  repeat bursts (fresh namespaces, earlier ones at rest), creation -> p50/p99/max s: {each}; "
            f"median p99 of all {len(bursts(r))} bursts: RayJob {fmt(median_p99(r), 2)} s, every child "
            f"{fmt(median_p99(r, 'every child'), 2)} s" + (f" (short of N: {short})" if short else "")]


def table(report: dict[str, Any]) -> str:
    lines = [f"llmops control plane vs KubeRay — {report['when']} — {report['machine']['summary']}",
             f"KubeRay {report['versions']['kuberay']} (defaults: reconcile-concurrency 1, qps 100, burst 200; "
             f"'equal': reconcile-concurrency {RECONCILE_SLOTS}), Kubernetes {report['versions']['kubernetes']}, "
             f"kopf {report['versions']['kopf']}, Python {report['versions']['python']}", ""]
    for r in report["results"]:
        lines += size_table(r)
    lines.append("Targets")
    for v in report["verdicts"]:
        lines.append(f"  {'PASS' if v['pass'] else 'MISS'}  {v['target']}: {v['value']}")
    return "\n".join(lines)


def machine_summary() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": model, "cores": os.cpu_count(), "memory_gib": round(mem_gb, 1),
            "kernel": platform.release(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
            "summary": f"{model}, {os.cpu_count()} cores, {mem_gb:.0f} GiB, shared (load avg at start "
                       f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())})"}


def versions() -> dict[str, str]:
    import importlib.metadata as md
    pinned = dict(line.split("=", 1) for line in (REPO / "tools/controlplane/versions.env").read_text().splitlines()
                  if "=" in line and not line.startswith("#"))
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return {"kubernetes": pinned.get("KUBERNETES_VERSION", "?"), "kuberay": pinned.get("KUBERAY_VERSION", "?"),
            "kopf": md.version("kopf"), "python": platform.python_version(), "commit": commit}
