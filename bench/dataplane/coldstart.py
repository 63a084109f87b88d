"""Scale to zero and back, timed: the LLMService with autoscaling.minReplicas 0, on the one-machine Ray cluster.

What is timed is Ray Serve's part: the app deployed with no replica, the first request (replica start, the model
fetched from the bucket, engine start), a warm request, Serve stopping the replica after the rendered idle delay,
and then the first request again, now with the model on the machine's disk: the cold start
docs/llmservice.md#scaling-to-zero asks for. A real cluster adds the Ray autoscaler's part on top (a GPU node if
none is free, the worker pod, `ray start`), which one machine cannot show: it depends on the cloud.
"""

from __future__ import annotations

import time
from typing import Any

import yaml

from . import manifests as m, raycluster as rc

SERVICE = f"{m.ZERO_SERVICE}-llm"
URL = "http://127.0.0.1:8000/v1"
REQUEST_TIMEOUT_S = 900   # a cold start waits for the engine; the load client's 120 s is for warm replicas


def model_replicas(status: dict[str, Any]) -> int | None:
    """Replicas of the model's deployment (LLMServer:<model id>) in the Serve status; None before it exists."""
    deployments = ((status.get("applications") or {}).get("llm") or {}).get("deployments") or {}
    models = [d for name, d in deployments.items() if name.startswith("LLMServer")]
    return sum(len(d.get("replicas") or []) for d in models) if models else None


def timed_request(messages: list[dict]) -> float:
    from openai import OpenAI

    client = OpenAI(base_url=URL, api_key="none", timeout=REQUEST_TIMEOUT_S, max_retries=0)
    start = time.perf_counter()
    client.chat.completions.create(model=m.MODEL_ID, messages=messages, temperature=0.0, max_tokens=m.MAX_TOKENS)
    return round(time.perf_counter() - start, 1)


def wait_for_zero(cluster: rc.RayCluster, timeout: float) -> float | None:
    """Seconds until the model has no replica, or None if it still has one after `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if model_replicas(cluster.serve_status()) == 0:
            return round(time.monotonic() - start, 1)
        time.sleep(2)
    return None


def measure(run: Any) -> dict[str, Any]:
    """The serve_cold_start phase of bench/dataplane/run.py's Run."""
    run.prepare_data()   # the model and rows in the bucket (kept from an earlier phase when there was one)
    service = rc.find(run.rendered, "RayService", SERVICE)
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    delay = config["applications"][0]["args"]["llm_configs"][0]["deployment_config"]["autoscaling_config"][
        "downscale_to_zero_delay_s"]
    cluster = run.cluster(service, ["serve"], run.work / "coldstart-result.json")
    cluster.start(service["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"])
    section: dict[str, Any] = {"scale_to_zero_delay_s": delay}

    def record(**values: Any) -> None:   # saved step by step: a call that runs out of time keeps what it measured
        section.update(values)
        run.save("serve_cold_start", section)

    try:
        cluster.deploy_serve(service["spec"]["serveConfigV2"])
        running, status = cluster.wait_serve_running(timeout=300)
        record(running=running, replicas_when_deployed=model_replicas(status))
        if running:
            messages = run._messages(run.test_rows()[:1])[0]
            record(first_request_s=timed_request(messages))    # the model comes from the bucket
            record(warm_request_s=timed_request(messages))
            record(to_zero_after_last_request_s=wait_for_zero(cluster, delay + 300))
            if section["to_zero_after_last_request_s"] is not None:
                record(cold_start_request_s=timed_request(messages))   # the model on this machine's disk
    finally:
        run._copy_ray_logs("coldstart")
        cluster.stop()
    return section
