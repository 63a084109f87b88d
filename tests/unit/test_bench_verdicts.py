"""bench/controlplane.py's pure parts: a p99 over fewer objects than the burst asked for is never a pass, every
child counted, every request of the operator's user counted, every target a verdict."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from controlplane_bench.measure import classify, complete_at, quantiles  # noqa: E402
from controlplane_bench.plane import expected_child_writes  # noqa: E402
from controlplane_bench.report import headlines, p99_verdict, verdicts  # noqa: E402

TARGET_KEYS = ["all_children_p99_s_n100", "rayjob_p99_s_n100", "ratio_all_children_n1000_default",
               "ratio_all_children_n1000_equal_concurrency", "idle_requests_per_min_n1000",
               "restart_new_rayjob_s_n5000", "rss_mb_ours_n5000", "peak_rss_mb"]


def _result(*latencies: list[float], n: int = 100) -> dict:
    first, *repeats = ({"creation_to_rayjob_s": quantiles(v)} for v in latencies)
    return {"n": n, "llmops_burst": first, "repeats": repeats}


def test_a_full_fast_burst_passes():
    verdict = p99_verdict(_result([0.5] * 100))
    assert verdict["pass"] is True and verdict["value"] == 0.5


def test_a_slow_burst_fails():
    assert p99_verdict(_result([0.5] * 98 + [2.0] * 2))["pass"] is False


@pytest.mark.parametrize("appeared", [0, 1, 60, 99])
def test_fewer_rayjobs_than_asked_for_fail_naming_the_shortfall(appeared):
    """The missing objects would be the slowest: a p99 of the ones that came looks fast and means nothing."""
    verdict = p99_verdict(_result([0.1] * appeared))
    assert verdict["pass"] is False
    assert verdict["value"] == f"no p99 over N: burst 1: {appeared} of 100 RayJobs"


def test_one_short_repeat_fails_the_median_of_full_ones():
    verdict = p99_verdict(_result([0.5] * 100, [0.5] * 100, [0.4] * 97, [0.5] * 100))
    assert verdict["pass"] is False and verdict["value"] == "no p99 over N: burst 3: 97 of 100 RayJobs"


def test_a_finetune_is_complete_when_its_last_child_is_seen():
    expected = {"a": [("RayJob", "a-ft"), ("ConfigMap", "a-ft-config"), ("ConfigMap", "shared")],
                "b": [("RayJob", "b-ft"), ("ConfigMap", "b-ft-config"), ("ConfigMap", "shared")]}
    seen = {("RayJob", "a-ft"): 1.0, ("ConfigMap", "a-ft-config"): 3.0, ("ConfigMap", "shared"): 2.0,
            ("RayJob", "b-ft"): 1.5}
    assert complete_at(expected, seen) == {"a": 3.0}      # b has no config yet: not complete, not counted
    seen[("ConfigMap", "b-ft-config")] = 4.0
    assert complete_at(expected, seen) == {"a": 3.0, "b": 4.0}


def test_every_request_of_the_operator_user_counts_whatever_its_agent():
    user = "system:serviceaccount:ns:op"
    assert classify("kopf/1.45.2", user, user) == "kopf"
    assert classify("llmops-operator", user, user) == "llmops"
    assert classify("Python-urllib/3.11", user, user) == "operator-other"
    assert classify("Python-urllib/3.11", "admin", user) is None
    assert classify("ray-operator/v1.5.0", "admin", user) == "kuberay"


def burst(n, complete, p99_children=0.8, p99_job=0.6, all_children_s=10.0):
    return {"creation_to_rayjob_s": quantiles([p99_job] * n),
            "creation_to_all_children_s": quantiles([p99_children] * complete),
            "all_children_after_s": all_children_s if complete == n else None,
            "writes": {"child_applies": expected_child_writes(n), "children_written_more_than_once": 0,
                       "status_writes": n},
            "status_changes_seen_per_finetune": 1.0}


def size(n, complete=None, kuberay_s=None, kuberay_equal_s=None, idle=None, restart_s=None, rss=100.0,
         kuberay_rss=None, **kw):
    r = {"n": n, "llmops_burst": burst(n, n if complete is None else complete, **kw), "handoff": None,
         "noop": None, "idle": idle, "operator": {"peak_rss_mb": rss},
         "restart": {"handled": True, "creation_to_rayjob_s": restart_s, "reconciles": n + 1,
                     "writes_for_existing": 0, "waited_s": 1.0} if restart_s is not None else None}
    if kuberay_s is not None:
        r["kuberay_burst"] = {"all_rayclusters_after_s": kuberay_s, "kuberay_peak_rss_mb": kuberay_rss or 0.0}
    if kuberay_equal_s is not None:
        r["kuberay_equal_burst"] = {"all_rayclusters_after_s": kuberay_equal_s}
    return r


def judged(results):
    return {v["key"]: v for v in verdicts(results)}


def test_every_target_is_a_verdict_and_one_not_measured_misses():
    v = judged([size(50)])
    for key in TARGET_KEYS:
        assert {"target", "value", "pass"} <= set(v[key]), key
    assert all(v[k]["value"] is None and v[k]["pass"] is False for k in TARGET_KEYS if k != "peak_rss_mb")


def test_all_children_p99_fails_when_one_finetune_lacks_a_child():
    whole = judged([size(100)])["all_children_p99_s_n100"]
    assert (whole["value"], whole["pass"]) == (0.8, True)
    short = judged([size(100, complete=99, p99_children=0.2)])["all_children_p99_s_n100"]
    assert (short["value"], short["pass"]) == ("no p99 over N: burst 1: 99 of 100 FineTunes with every child", False)
    assert headlines([size(100, complete=99)])["all_children_p99_s_n100"] is None
    slow = judged([size(100, p99_children=1.2)])["all_children_p99_s_n100"]
    assert (slow["value"], slow["pass"]) == (1.2, False)


def test_two_kuberay_verdicts_at_n1000():
    v = judged([size(1000, all_children_s=10.0, kuberay_s=40.0, kuberay_equal_s=15.0)])
    assert (v["ratio_all_children_n1000_default"]["value"], v["ratio_all_children_n1000_default"]["pass"]) == \
        (0.25, True)
    assert (v["ratio_all_children_n1000_equal_concurrency"]["value"],
            v["ratio_all_children_n1000_equal_concurrency"]["pass"]) == (0.667, False)
    # ours missing a child somewhere: no time to every child, no ratio
    v = judged([size(1000, complete=999, kuberay_s=40.0, kuberay_equal_s=40.0)])
    assert v["ratio_all_children_n1000_default"]["pass"] is False
    # KubeRay never made every RayCluster: no ratio either
    v = judged([size(1000, kuberay_s=None, kuberay_equal_s=None)])
    assert v["ratio_all_children_n1000_default"]["value"] is None


def idle(window_s, requests):
    return {"window_s": window_s, "requests": requests, "requests_per_min": round(requests / (window_s / 60), 3)}


def test_idle_is_judged_over_ten_minutes_in_total():
    assert judged([size(1000, idle=idle(600.0, 5))])["idle_requests_per_min_n1000"]["pass"] is True
    # seven watch streams renewed every 5 minutes: 1.4 requests/min, a miss
    v = judged([size(1000, idle=idle(600.0, 14))])["idle_requests_per_min_n1000"]
    assert (v["value"], v["pass"]) == (1.4, False)
    # a quiet minute proves nothing
    assert judged([size(1000, idle=idle(60.0, 0))])["idle_requests_per_min_n1000"]["pass"] is False


def test_restart_and_rss_at_n5000_from_the_same_run():
    v = judged([size(5000, restart_s=2.5, rss=233.0, kuberay_s=300.0, kuberay_rss=500.0)])
    assert (v["restart_new_rayjob_s_n5000"]["pass"], v["rss_mb_ours_n5000"]["pass"]) == (True, True)
    h = headlines([size(5000, restart_s=2.5, rss=233.0, kuberay_s=300.0, kuberay_rss=500.0)])
    assert (h["rss_mb_ours_n5000"], h["rss_mb_kuberay_n5000"], h["restart_new_rayjob_s_n5000"]) == \
        (233.0, 500.0, 2.5)
    v = judged([size(5000, restart_s=18.3, rss=233.0, kuberay_s=300.0, kuberay_rss=200.0)])
    assert (v["restart_new_rayjob_s_n5000"]["pass"], v["rss_mb_ours_n5000"]["pass"]) == (False, False)
    # without KubeRay's burst at 5000 there is nothing to compare with
    assert judged([size(5000, restart_s=2.5, rss=233.0)])["rss_mb_ours_n5000"]["pass"] is False


def test_a_kuberay_burst_cut_at_its_clusters_says_so_in_the_rss_verdict():
    full = size(5000, restart_s=2.5, rss=233.0, kuberay_s=300.0, kuberay_rss=500.0)
    assert "until every RayCluster" not in judged([full])["rss_mb_ours_n5000"]["target"]
    full["kuberay_burst"]["until"] = "clusters"
    assert "until every RayCluster existed" in judged([full])["rss_mb_ours_n5000"]["target"]
