"""Verdicts against the issue's targets, and the tables the bench prints."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
from typing import Any

from . import REPO
from .measure import TARGETS
from .plane import expected_child_writes
from .phases import burst_p99s


# ---- report ------------------------------------------------------------------------------------------------
def verdicts(results: list[dict]) -> list[dict[str, Any]]:
    by_n = {r["n"]: r for r in results}
    out = []
    if 100 in by_n:
        p99s = burst_p99s(by_n[100])
        p99 = statistics.median(p99s)
        out.append({"target": "p99 creation -> RayJob <= 1 s at N=100"
                              + (f" (median of {len(p99s)} bursts: {', '.join(f'{v:.2f}' for v in p99s)})"
                                 if len(p99s) > 1 else ""),
                    "value": p99, "pass": p99 is not None and p99 <= TARGETS["p99_rayjob_n100_s"]})
    if 1000 in by_n and by_n[1000].get("kuberay_burst"):
        r = by_n[1000]
        ratio = r["llmops_burst"]["all_rayjobs_after_s"] / max(r["kuberay_burst"]["all_rayclusters_after_s"], 1e-9)
        out.append({"target": "N=1000: every RayJob exists <= KubeRay's every RayCluster exists (ratio <= 1)",
                    "value": round(ratio, 2), "pass": ratio <= TARGETS["all_children_ratio_n1000"]})
    for r in results:
        w = r["llmops_burst"]["writes"]
        h = r["handoff"] or {"writes": {"child_applies": 0}, "status_writes": 0, "status_changes_seen": 0}
        expected = expected_child_writes(r["n"])
        once = w["children_written_more_than_once"] == 0 and w["child_applies"] == expected \
            and h["writes"]["child_applies"] == 0
        out.append({"target": f"N={r['n']}: one write per child ({expected} for {r['n']} FineTunes: "
                              f"{(expected - 1) // r['n']} each + the shared payload ConfigMap)",
                    "value": f"{(w['child_applies'] + h['writes']['child_applies']) / r['n']:.2f}/FineTune, "
                             f"{w['children_written_more_than_once']} children written twice+",
                    "pass": once})
        burst_status = w["status_writes"]
        seen = r["llmops_burst"]["status_changes_seen_per_finetune"] * r["n"]
        out.append({"target": f"N={r['n']}: status writes only on real changes",
                    "value": f"burst {burst_status} writes / {seen:.0f} changes; hand-off {h['status_writes']} "
                             f"writes / {h['status_changes_seen']} changes",
                    "pass": burst_status <= seen and h["status_writes"] <= h["status_changes_seen"]})
        out.append({"target": f"N={r['n']}: zero writes for a reconcile that changes nothing",
                    "value": f"{r['noop']['writes']} writes in {r['noop']['reconciles']} reconciles",
                    "pass": r["noop"]["writes"] == 0 and r["noop"]["reconciles"] >= r["n"]})
        out.append({"target": f"N={r['n']}: idle API traffic <= 1 request/min per 100 resources",
                    "value": r["steady"]["requests_per_min_per_100"],
                    "pass": r["steady"]["requests_per_min_per_100"] <= TARGETS["idle_requests_per_min_per_100"]})
        rs = r["restart"]
        out.append({"target": f"N={r['n']}: restart with N at rest: handles a new FineTune, writes nothing for "
                              "the others",
                    "value": (f"RayJob after {rs['creation_to_rayjob_s']} s, {rs['reconciles']} reconciles, "
                              f"{rs['writes_for_existing']} writes for existing" if rs["handled"] else
                              f"not handled after {rs['waited_s']} s ({rs['reconciles']} reconciles)"),
                    "pass": rs["handled"] and rs["writes_for_existing"] == 0})
    largest = max(results, key=lambda r: r["n"])
    out.append({"target": f"peak RSS <= 250 MB at the largest N ({largest['n']})",
                "value": round(largest["operator"]["peak_rss_mb"], 1),
                "pass": largest["operator"]["peak_rss_mb"] <= TARGETS["peak_rss_mb"]})
    return out


def fmt_q(q: dict) -> str:
    if not q or q.get("p50") is None:
        return "n/a"
    return f"{q['p50']:.2f} / {q['p99']:.2f} / {q['max']:.2f}"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "n/a"


def size_table(r: dict[str, Any]) -> list[str]:
    b, s = r["llmops_burst"], r["steady"]
    if not r.get("kuberay_burst") or not r.get("handoff"):
        return ours_only_table(r)
    k, h = r["kuberay_burst"], r["handoff"]
    lines: list[str] = []
    life_requests = b["requests"]["total"] + h["requests"]["total"]
    life_cpu = b["cpu_s"] + h["cpu_s"]
    rows = [
        ("", "llmops: FineTune->RayJob", "KubeRay: RayJob->RayCluster", "ours/KubeRay"),
        ("creation -> child p50/p99/max s", fmt_q(b["creation_to_rayjob_s"]), fmt_q(k["creation_to_raycluster_s"]),
         ratio(b["creation_to_rayjob_s"]["p99"], k["creation_to_raycluster_s"]["p99"]) + " (p99)"),
        ("every child exists after s", f"{b['all_rayjobs_after_s']:.1f}", f"{k['all_rayclusters_after_s']:.1f}",
         ratio(b["all_rayjobs_after_s"], k["all_rayclusters_after_s"])),
        ("API requests/resource, first step", f"{b['requests']['per_finetune']:.2f}",
         f"{k['requests_until_all_clusters']['per_rayjob']:.2f}",
         ratio(b["requests"]["per_finetune"], k["requests_until_all_clusters"]["per_rayjob"])),
        ("API requests/resource, whole life", f"{life_requests / r['n']:.2f}",
         f"{k['requests_lifecycle']['per_rayjob']:.2f}", ratio(life_requests / r["n"],
                                                               k["requests_lifecycle"]["per_rayjob"])),
        ("CPU ms/resource, first step", f"{1000 * b['cpu_s'] / r['n']:.1f}",
         f"{1000 * k['cpu_s_until_all_clusters'] / r['n']:.1f}", ratio(b["cpu_s"], k["cpu_s_until_all_clusters"])),
        ("CPU ms/resource, whole life", f"{1000 * life_cpu / r['n']:.1f}",
         f"{1000 * k['cpu_s_lifecycle'] / r['n']:.1f}", ratio(life_cpu, k["cpu_s_lifecycle"])),
        ("peak RSS MB", f"{r['operator']['peak_rss_mb']:.0f}", f"{k['kuberay_peak_rss_mb']:.0f}",
         ratio(r["operator"]["peak_rss_mb"], k["kuberay_peak_rss_mb"])),
        ("machine busy / others' share", f"{b['machine']['machine_busy_pct']:.0f}% / "
         f"{b['machine']['others_busy_pct']:.0f}%", f"{k['machine']['machine_busy_pct']:.0f}% / "
         f"{k['machine']['others_busy_pct']:.0f}%", ""),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines.append(f"N = {r['n']}")
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    w = b["writes"]
    lines += [
        f"  where the time goes: ours creation -> first request {fmt_q(b['creation_to_first_request_s'])} s, "
        f"first request -> RayJob applied {fmt_q(b['first_request_to_rayjob_apply_s'])} s; KubeRay creation -> "
        f"first request {fmt_q(k['creation_to_first_request_s'])} s, first request -> RayCluster seen "
        f"{fmt_q(k['first_request_to_raycluster_s'])} s",
        f"  requests by verb, first step: ours {b['requests']['by_verb']}; KubeRay's "
        f"{k['requests_until_all_clusters']['by_verb']}",
        f"  requests by verb, whole life: ours (hand-off) {h['requests']['by_verb']}; KubeRay's "
        f"{k['requests_lifecycle']['by_verb']}",
        f"  our writes per FineTune (burst): {w['child_applies_per_finetune']:.2f} child applies "
        f"({w['children_written_more_than_once']} of {w['children_written']} children written more than once, "
        f"max {w['max_writes_one_child']}), {w['status_writes_per_finetune']:.2f} status writes "
        f"for {b['status_changes_seen_per_finetune']:.2f} status changes seen, "
        f"{w['events'] / r['n']:.2f} events",
        f"  hand-off (KubeRay started after our burst): KubeRay start -> phase leaves Pending "
        f"{fmt_q(h['kuberay_start_to_phase_left_pending_s'])} s; RayJob Running -> FineTune Running "
        f"{fmt_q(h['rayjob_running_to_phase_left_pending_s'])} s; RayJob Failed -> FineTune Failed "
        f"{fmt_q(h['rayjob_finished_to_phase_finished_s'])} s; {h['status_writes']} status writes for "
        f"{h['status_changes_seen']} status changes; {h['writes']['child_applies']} child re-applies; "
        f"final phases {h['phases']}",
        *repeat_lines(r),
        f"  no-op: {r['noop']['touched']} touches -> {r['noop']['reconciles']} reconciles, "
        f"{r['noop']['writes']} writes, {r['noop']['requests']} requests",
        f"  restart with {r['n']} at rest: " + (
            f"new FineTune's RayJob after {r['restart']['creation_to_rayjob_s']} s; "
            f"{r['restart']['reconciles']} reconciles, {r['restart']['writes_for_existing']} writes for the "
            f"existing ones" if r["restart"]["handled"] else
            f"NOT HANDLED: no RayJob {r['restart']['waited_s']} s after creating a FineTune; "
            f"{r['restart']['reconciles']} reconciles ran"),
        f"  steady {s['window_s']:.0f}s: {s['requests_per_min']:.2f} requests/min "
        f"({s['requests_per_min_per_100']:.3f} per 100 resources) {s['by_resource']}, "
        f"{s['cpu_s_per_min']:.3f} CPU s/min, RSS {s['rss_mb']:.0f} MB; watch renewals add "
        f"{s['watch_renewals_per_min']:.2f}/min on average ({s['watch_renewals_per_min_per_100']:.3f} per 100); "
        "KubeRay "
        f"{s['kuberay_requests_per_min']:.2f} requests/min, {s['kuberay_cpu_s_per_min']:.3f} CPU s/min",
        "",
    ]
    return lines


def repeat_lines(r: dict[str, Any]) -> list[str]:
    if not r.get("repeats"):
        return []
    bursts = "; ".join(f"{fmt_q(b['creation_to_rayjob_s'])} s, all after {b['all_rayjobs_after_s']:.1f} s"
                       for b in r["repeats"])
    p99s = burst_p99s(r)
    return [f"  repeat bursts (fresh namespaces, earlier ones at rest), creation -> RayJob p50/p99/max: {bursts}; "
            f"median p99 of all {len(p99s)} bursts {statistics.median(p99s):.2f} s"]


def ours_only_table(r: dict[str, Any]) -> list[str]:
    """A size run without KubeRay (--ours-only): our operator's figures alone."""
    b, s, w, rs = r["llmops_burst"], r["steady"], r["llmops_burst"]["writes"], r["restart"]
    return [
        f"N = {r['n']} (our operator only: no KubeRay burst, no hand-off)",
        f"  creation -> RayJob p50/p99/max {fmt_q(b['creation_to_rayjob_s'])} s; every RayJob after "
        f"{b['all_rayjobs_after_s']:.1f} s; {b['requests']['per_finetune']:.2f} API requests and "
        f"{1000 * b['cpu_s'] / r['n']:.1f} CPU ms per FineTune",
        f"  our writes per FineTune (burst): {w['child_applies_per_finetune']:.2f} child applies "
        f"({w['children_written_more_than_once']} children written more than once), "
        f"{w['status_writes_per_finetune']:.2f} status writes for {b['status_changes_seen_per_finetune']:.2f} "
        f"status changes seen",
        *repeat_lines(r),
        f"  no-op: {r['noop']['touched']} touches -> {r['noop']['reconciles']} reconciles, "
        f"{r['noop']['writes']} writes",
        f"  restart with {r['n']} at rest: new FineTune's RayJob after {rs['creation_to_rayjob_s']} s, "
        f"{rs['writes_for_existing']} writes for the existing ones" if rs["handled"] else
        f"  restart with {r['n']} at rest: NOT HANDLED after {rs['waited_s']} s",
        f"  steady {s['window_s']:.0f}s: {s['requests_per_min']:.2f} requests/min, {s['cpu_s_per_min']:.3f} CPU "
        f"s/min; peak RSS {r['operator']['peak_rss_mb']:.0f} MB",
        "",
    ]


def table(report: dict[str, Any]) -> str:
    lines = [f"llmops control plane vs KubeRay — {report['when']} — {report['machine']['summary']}",
             f"KubeRay {report['versions']['kuberay']} (plane defaults: reconcile-concurrency 1, qps 100), "
             f"Kubernetes {report['versions']['kubernetes']}, kopf {report['versions']['kopf']}, "
             f"Python {report['versions']['python']}", ""]
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
