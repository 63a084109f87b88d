"""LLMService builders: adapter resolution, serveConfigV2 and the cluster fingerprint (pure; no Ray needed).

Whether Ray 2.60 itself accepts what is rendered here is checked in tests/unit/payloads/test_serve_config_ray.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from llmops.api.batchinference import BatchInferenceStatus
from llmops.api.finetune import FineTuneStatus
from llmops.api.llmservice import LLMServiceSpec, LLMServiceStatus
from llmops.builders.serving import (
    FAILED,
    GATE_NOT_MET,
    SERVING,
    UNSUPPORTED,
    WAITING_FOR_EVALUATION,
    WAITING_FOR_FINETUNE,
    ServeConfigError,
    cluster_fingerprint,
    engine_kwargs,
    serve_config,
)
from llmops.builders.serving import resolve_adapters as resolve_typed
from llmops.builders.serving import routing as serving_routing

BASE = "Qwen/Qwen2.5-7B-Instruct"
BUCKET = "s3://ml-artifacts/viggo/adapters"


def make_spec(adapters: list[dict] | None = None, **fields: Any) -> LLMServiceSpec:
    body: dict[str, Any] = {"modelId": "ft-model", "model": {"source": BASE}, **fields}
    if adapters is not None:
        body["adapters"] = adapters
    return LLMServiceSpec.model_validate(body)


def ready(type_reason: str = "Succeeded", **status: Any) -> dict[str, Any]:
    return {"phase": "Succeeded", "observedGeneration": 1,
            "conditions": [{"type": "Ready", "status": "True", "reason": type_reason, "message": "done",
                            "observedGeneration": 1, "lastTransitionTime": "2026-11-25T20:00:00Z"},
                           {"type": "Reconciling", "status": "False", "reason": type_reason},
                           {"type": "Stalled", "status": "False", "reason": type_reason}],
            **status}


def finetune_ready(uri: str, rank: int = 8) -> dict[str, Any]:
    return ready(adapter={"uri": uri, "baseModel": BASE, "rank": rank},
                 metrics={"trainLoss": 0.21, "evalLoss": 0.19})


def running(phase: str = "Running") -> dict[str, Any]:
    return {"phase": phase, "observedGeneration": 1,
            "conditions": [{"type": "Ready", "status": "False", "reason": phase,
                            "message": "RayJob viggo-ft-train is RUNNING"},
                           {"type": "Reconciling", "status": "True", "reason": phase}],
            "rayJobName": "viggo-ft-train"}


def failed(why: str) -> dict[str, Any]:
    return {"phase": "Failed", "observedGeneration": 1, "message": why,
            "conditions": [{"type": "Ready", "status": "False", "reason": "Failed", "message": why},
                           {"type": "Stalled", "status": "True", "reason": "JobFailed", "message": why}]}


def evaluated(adapter_uri: str | None = None, **metrics: float) -> dict[str, Any]:
    extra = {"adapterURI": adapter_uri} if adapter_uri else {}
    return ready(metrics={"rows": 714, **metrics}, outputURI="s3://ml-artifacts/viggo/eval", **extra)


def gated(name: str, minimum: float = 0.8, metric: str = "exactMatch", **source: Any) -> dict[str, Any]:
    return {"name": name, **source,
            "gate": {"batchInferenceRef": {"name": f"{name}-eval"}, "metric": metric, "minimum": minimum}}


def resolve_adapters(spec: LLMServiceSpec, finetunes: dict[str, dict], batchinferences: dict[str, dict]):
    """resolve_adapters over statuses as the API server holds them, read the way the operator reads them."""
    return resolve_typed(spec, {name: FineTuneStatus.read(s) for name, s in finetunes.items()},
                         {name: BatchInferenceStatus.read(s) for name, s in batchinferences.items()})


def only_state(plan) -> dict[str, Any]:
    assert len(plan.states) == 1
    return plan.states[0]


# ---- adapter states -------------------------------------------------------------------------------------------
def test_no_adapters_serves_the_base_model_only():
    plan = resolve_adapters(make_spec(), {}, {})
    assert plan.dynamic_lora_loading_path is None
    assert (plan.served, plan.states, plan.models) == ([], [], ["ft-model"])
    assert plan.summary == "serving ft-model without adapters"


def test_uri_adapter_is_served_under_its_parent():
    plan = resolve_adapters(make_spec([{"name": "viggo", "uri": f"{BUCKET}/viggo"}]), {}, {})
    assert plan.dynamic_lora_loading_path == BUCKET
    assert plan.served == [("viggo", f"{BUCKET}/viggo")]
    assert plan.models == ["ft-model", "ft-model:viggo"]
    assert only_state(plan) == {"name": "viggo", "uri": f"{BUCKET}/viggo", "state": SERVING,
                                "message": "served as ft-model:viggo"}
    assert plan.summary == "1/1 adapters served (viggo)"


def test_finetune_ready_is_served_from_its_reported_adapter():
    spec = make_spec([{"name": "viggo", "fineTuneRef": {"name": "viggo-ft"}}])
    plan = resolve_adapters(spec, {"viggo-ft": finetune_ready(f"{BUCKET}/viggo")}, {})
    assert only_state(plan)["state"] == SERVING
    assert plan.served == [("viggo", f"{BUCKET}/viggo")]


@pytest.mark.parametrize("status, shown", [(running(), "Running"), (running("Waiting"), "Waiting"),
                                           ({}, "Pending"), (running("Suspended"), "Suspended")])
def test_finetune_not_ready_waits(status, shown):
    spec = make_spec([{"name": "viggo", "fineTuneRef": {"name": "viggo-ft"}}])
    state = only_state(resolve_adapters(spec, {"viggo-ft": status}, {}))
    assert state["state"] == WAITING_FOR_FINETUNE
    assert state["uri"] is None
    assert f"FineTune viggo-ft is {shown}" in state["message"]


def test_finetune_stuck_pending_waits_and_says_why():
    why = "pod viggo-ft-gpu-0 cannot be scheduled: 0/3 nodes have nvidia.com/gpu"
    stuck = {"phase": "Pending", "conditions": [
        {"type": "Ready", "status": "False", "reason": "Unschedulable", "message": why},
        {"type": "Stalled", "status": "True", "reason": "Unschedulable", "message": why}]}
    spec = make_spec([{"name": "viggo", "fineTuneRef": {"name": "viggo-ft"}}])
    state = only_state(resolve_adapters(spec, {"viggo-ft": stuck}, {}))
    assert state["state"] == WAITING_FOR_FINETUNE
    assert state["message"] == f"FineTune viggo-ft is Pending and stuck: {why}"


def test_finetune_failed_or_missing_fails_naming_it():
    spec = make_spec([{"name": "viggo", "fineTuneRef": {"name": "viggo-ft"}},
                      {"name": "other", "fineTuneRef": {"name": "gone"}}])
    plan = resolve_adapters(spec, {"viggo-ft": failed("RayJob failed: CUDA out of memory")}, {})
    viggo, other = plan.states
    assert viggo["state"] == FAILED
    assert viggo["message"] == "FineTune viggo-ft failed: RayJob failed: CUDA out of memory"
    assert other["state"] == FAILED
    assert other["message"] == "FineTune gone does not exist in this namespace"
    assert plan.dynamic_lora_loading_path is None
    assert plan.summary == "0/2 adapters served; not served: viggo (Failed), other (Failed)"


def test_finetune_ready_without_adapter_uri_fails():
    spec = make_spec([{"name": "viggo", "fineTuneRef": {"name": "viggo-ft"}}])
    state = only_state(resolve_adapters(spec, {"viggo-ft": ready()}, {}))
    assert state["state"] == FAILED
    assert "no status.adapter.uri" in state["message"]


def test_finetune_rank_above_max_rank_is_unsupported():
    spec = make_spec([{"name": "viggo", "fineTuneRef": {"name": "viggo-ft"}}], lora={"maxRank": 16})
    state = only_state(resolve_adapters(spec, {"viggo-ft": finetune_ready(f"{BUCKET}/viggo", rank=32)}, {}))
    assert state["state"] == UNSUPPORTED
    assert "rank 32 exceeds spec.lora.maxRank 16" in state["message"]


@pytest.mark.parametrize("evaluations, shown", [
    ({}, "BatchInference viggo-eval (the gate's evaluation) does not exist yet"),
    ({"viggo-eval": running()}, "BatchInference viggo-eval is Running (the gate waits for it)"),
    ({"viggo-eval": {"phase": "Pending"}}, "BatchInference viggo-eval is Pending (the gate waits for it)"),
    ({"viggo-eval": failed("rows column input missing")},
     "BatchInference viggo-eval (the gate's evaluation) failed; run it again: rows column input missing"),
])
def test_gate_without_a_ready_evaluation_waits(evaluations, shown):
    spec = make_spec([gated("viggo", uri=f"{BUCKET}/viggo")])
    state = only_state(resolve_adapters(spec, {}, evaluations))
    assert state["state"] == WAITING_FOR_EVALUATION
    assert state["message"] == shown


def test_gate_below_minimum_is_not_met_with_measured_and_minimum():
    spec = make_spec([gated("viggo", uri=f"{BUCKET}/viggo")])
    plan = resolve_adapters(spec, {}, {"viggo-eval": evaluated(exactMatch=0.7123)})
    state = only_state(plan)
    assert state["state"] == GATE_NOT_MET
    assert state["message"] == ("exactMatch 0.7123 over 714 rows (BatchInference viggo-eval) is below the "
                                "minimum 0.8")
    assert plan.dynamic_lora_loading_path is None and plan.models == ["ft-model"]


@pytest.mark.parametrize("value", [0.8, 0.93])
def test_gate_met_serves(value):
    spec = make_spec([gated("viggo", uri=f"{BUCKET}/viggo")])
    plan = resolve_adapters(spec, {}, {"viggo-eval": evaluated(exactMatch=value)})
    assert only_state(plan)["state"] == SERVING


def test_gate_on_another_metric_reads_that_metric():
    spec = make_spec([gated("viggo", minimum=0.9, metric="attributeF1", uri=f"{BUCKET}/viggo")])
    status = evaluated(exactMatch=0.95, attributeF1=0.87)
    state = only_state(resolve_adapters(spec, {}, {"viggo-eval": status}))
    assert state["state"] == GATE_NOT_MET
    assert state["message"].startswith("attributeF1 0.87 ")


def test_gate_metric_not_reported_is_not_met():
    spec = make_spec([gated("viggo", metric="functionNameAccuracy", uri=f"{BUCKET}/viggo")])
    state = only_state(resolve_adapters(spec, {}, {"viggo-eval": evaluated(exactMatch=0.9)}))
    assert state["state"] == GATE_NOT_MET
    assert "reports no functionNameAccuracy" in state["message"]


def test_gate_evaluation_of_another_adapter_does_not_count():
    spec = make_spec([gated("viggo", fineTuneRef={"name": "viggo-ft"})])
    finetunes = {"viggo-ft": finetune_ready(f"{BUCKET}/viggo")}
    stale = evaluated(adapter_uri=f"{BUCKET}/viggo-old", exactMatch=0.99)
    state = only_state(resolve_adapters(spec, finetunes, {"viggo-eval": stale}))
    assert state["state"] == WAITING_FOR_EVALUATION
    assert f"evaluated {BUCKET}/viggo-old, not this adapter" in state["message"]
    same = evaluated(adapter_uri=f"{BUCKET}/viggo/", exactMatch=0.99)
    assert only_state(resolve_adapters(spec, finetunes, {"viggo-eval": same}))["state"] == SERVING


def test_gate_waits_for_the_finetune_first():
    spec = make_spec([gated("viggo", fineTuneRef={"name": "viggo-ft"})])
    state = only_state(resolve_adapters(spec, {"viggo-ft": running()}, {}))
    assert state["state"] == WAITING_FOR_FINETUNE


def test_pvc_adapter_is_unsupported_and_says_what_to_do():
    spec = make_spec([{"name": "viggo", "uri": "pvc://shared/viggo"}])
    state = only_state(resolve_adapters(spec, {}, {}))
    assert state["state"] == UNSUPPORTED
    assert "s3://, gs://, abfss://, azure://" in state["message"]
    assert "not from a PersistentVolumeClaim" in state["message"]
    assert "copy the adapter folder to object storage" in state["message"]


def test_finetune_writing_to_a_pvc_is_unsupported():
    spec = make_spec([{"name": "viggo", "fineTuneRef": {"name": "viggo-ft"}}])
    state = only_state(resolve_adapters(spec, {"viggo-ft": finetune_ready("pvc://shared/out/viggo")}, {}))
    assert state["state"] == UNSUPPORTED
    assert state["uri"] == "pvc://shared/out/viggo"


def test_bucket_root_is_not_an_adapter_folder():
    state = only_state(resolve_adapters(make_spec([{"name": "viggo", "uri": "gs://bucket/"}]), {}, {}))
    assert state["state"] == UNSUPPORTED
    assert "bucket root" in state["message"]


def test_folder_named_differently_is_unsupported_and_says_where_it_must_be():
    spec = make_spec([{"name": "viggo", "uri": f"{BUCKET}/viggo"},
                      {"name": "viggo-v2", "fineTuneRef": {"name": "viggo-v2-ft"}}])
    finetunes = {"viggo-v2-ft": finetune_ready("s3://ml-artifacts/runs/v2/output")}
    plan = resolve_adapters(spec, finetunes, {})
    assert [s["state"] for s in plan.states] == [SERVING, UNSUPPORTED]
    assert plan.states[1]["message"] == (
        "clients ask for ft-model:viggo-v2 and Ray Serve loads that from s3://ml-artifacts/viggo/adapters/viggo-v2, "
        "but the adapter is at s3://ml-artifacts/runs/v2/output: write (or copy) it to "
        "s3://ml-artifacts/viggo/adapters/viggo-v2, or rename the adapter to output")
    assert plan.models == ["ft-model", "ft-model:viggo"]


def test_not_served_folder_under_the_loading_path_is_reported_as_reachable():
    spec = make_spec([{"name": "viggo", "uri": f"{BUCKET}/viggo"},
                      gated("viggo-v2", uri=f"{BUCKET}/viggo-v2"),
                      {"name": "v3", "uri": f"{BUCKET}/Candidate-3"}])
    plan = resolve_adapters(spec, {}, {"viggo-v2-eval": evaluated(exactMatch=0.5)})
    _, gate, misnamed = plan.states
    assert gate["state"] == GATE_NOT_MET
    assert gate["message"].endswith(f"(not published, yet its folder is under {BUCKET}, so Ray Serve still lists "
                                    "ft-model:viggo-v2 and loads it on request)")
    assert misnamed["state"] == UNSUPPORTED
    assert "rename the adapter" not in misnamed["message"]  # Candidate-3 is no valid adapter name
    assert "Ray Serve still lists ft-model:Candidate-3" in misnamed["message"]
    assert plan.models == ["ft-model", "ft-model:viggo"]


# ---- the loading path -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("parent", ["s3://ml-artifacts/viggo/adapters", "gs://ml-artifacts/viggo/adapters",
                                    "abfss://models@acct.dfs.core.windows.net/adapters", "azure://models/adapters"])
def test_common_parent_is_the_loading_path(parent):
    spec = make_spec([{"name": "viggo", "uri": f"{parent}/viggo/"}, {"name": "e2e", "uri": f"{parent}//e2e"},
                      {"name": "nlg", "uri": f"{parent}/nlg"}])
    plan = resolve_adapters(spec, {}, {})
    assert plan.dynamic_lora_loading_path == parent
    assert plan.served == [("viggo", f"{parent}/viggo"), ("nlg", f"{parent}/nlg")]
    assert plan.states[1]["state"] == UNSUPPORTED  # `<parent>//e2e` has parent `<parent>/`


def test_trailing_slashes_do_not_change_the_parent():
    spec = make_spec([{"name": "viggo", "uri": f"{BUCKET}/viggo///"}, {"name": "nlg", "uri": f"{BUCKET}/nlg"}])
    plan = resolve_adapters(spec, {}, {})
    assert plan.dynamic_lora_loading_path == BUCKET
    assert [s["state"] for s in plan.states] == [SERVING, SERVING]
    assert plan.states[0]["uri"] == f"{BUCKET}/viggo///"  # reported as given
    assert plan.served[0] == ("viggo", f"{BUCKET}/viggo")  # the folder Ray Serve loads


def test_mixed_parents_serve_the_larger_group_and_name_both_parents():
    spec = make_spec([{"name": "viggo", "uri": "gs://other/adapters/viggo"},
                      {"name": "e2e", "uri": f"{BUCKET}/e2e"}, {"name": "nlg", "uri": f"{BUCKET}/nlg"}])
    plan = resolve_adapters(spec, {}, {})
    assert plan.dynamic_lora_loading_path == BUCKET
    assert [s["state"] for s in plan.states] == [UNSUPPORTED, SERVING, SERVING]
    message = plan.states[0]["message"]
    assert "gs://other/adapters" in message and BUCKET in message
    assert "spec.lora.dynamicLoadingPath" in message
    assert plan.summary == "2/3 adapters served (e2e, nlg); not served: viggo (Unsupported)"


def test_mixed_parents_tie_goes_to_the_first_adapter():
    spec = make_spec([{"name": "viggo", "uri": "gs://other/adapters/viggo"}, {"name": "e2e", "uri": f"{BUCKET}/e2e"}])
    plan = resolve_adapters(spec, {}, {})
    assert plan.dynamic_lora_loading_path == "gs://other/adapters"
    assert [s["state"] for s in plan.states] == [SERVING, UNSUPPORTED]


def test_parent_is_chosen_among_servable_adapters_only():
    spec = make_spec([gated("viggo", uri="gs://other/adapters/viggo"), {"name": "e2e", "uri": f"{BUCKET}/e2e"}])
    plan = resolve_adapters(spec, {}, {})
    assert plan.dynamic_lora_loading_path == BUCKET
    assert [s["state"] for s in plan.states] == [WAITING_FOR_EVALUATION, SERVING]


def test_dynamic_loading_path_given_requires_adapters_directly_under_it():
    spec = make_spec([{"name": "viggo", "uri": f"{BUCKET}/viggo"},
                      {"name": "nested", "uri": f"{BUCKET}/runs/nested"},
                      {"name": "e2e", "uri": "gs://elsewhere/e2e"}],
                     lora={"dynamicLoadingPath": f"{BUCKET}/"})
    plan = resolve_adapters(spec, {}, {})
    assert plan.dynamic_lora_loading_path == BUCKET
    assert [s["state"] for s in plan.states] == [SERVING, UNSUPPORTED, UNSUPPORTED]
    assert plan.states[1]["message"] == (f"it sits under {BUCKET}/runs, not directly under "
                                         f"spec.lora.dynamicLoadingPath {BUCKET}: move it to {BUCKET}/nested")
    assert "gs://elsewhere" in plan.states[2]["message"]


def test_dynamic_loading_path_given_but_nothing_servable_renders_no_lora_config():
    spec = make_spec([{"name": "viggo", "fineTuneRef": {"name": "viggo-ft"}}], lora={"dynamicLoadingPath": BUCKET})
    plan = resolve_adapters(spec, {"viggo-ft": running()}, {})
    assert plan.dynamic_lora_loading_path is None
    assert "lora_config" not in _llm_config(spec, plan)


def test_states_follow_spec_order_and_fit_the_status_model():
    spec = make_spec([{"name": "a", "fineTuneRef": {"name": "a-ft"}}, {"name": "b", "uri": f"{BUCKET}/b"},
                      gated("c", uri=f"{BUCKET}/c"), {"name": "d", "uri": "pvc://x/d"}])
    plan = resolve_adapters(spec, {"a-ft": running()}, {"c-eval": running()})
    assert [s["name"] for s in plan.states] == ["a", "b", "c", "d"]
    assert plan.summary == ("1/4 adapters served (b); waiting: a (WaitingForFineTune), c (WaitingForEvaluation); "
                            "not served: d (Unsupported)")
    status = LLMServiceStatus.model_validate({"models": plan.models, "adapters": plan.states})
    assert [a.state for a in status.adapters] == [WAITING_FOR_FINETUNE, SERVING, WAITING_FOR_EVALUATION,
                                                  UNSUPPORTED]


# ---- serveConfigV2 ------------------------------------------------------------------------------------------------
def _llm_config(spec: LLMServiceSpec, plan, **kw: Any) -> dict[str, Any]:
    kw.setdefault("accelerator_type", "L4")
    kw.setdefault("runtime_env", {})
    return serve_config(spec, plan, **kw)["applications"][0]["args"]["llm_configs"][0]


def test_serve_config_exact_output():
    spec = make_spec([{"name": "viggo", "uri": f"{BUCKET}/viggo"}],
                     engine={"maxModelLen": 8192, "maxNumBatchedTokens": 8192, "gpuMemoryUtilization": 0.9},
                     autoscaling={"minReplicas": 1, "maxReplicas": 4, "targetOngoingRequests": 32},
                     lora={"maxAdaptersPerReplica": 8, "maxRank": 16})
    plan = resolve_adapters(spec, {}, {})
    runtime_env = {"env_vars": {"AWS_REGION": "us-west-2"}}
    rendered = serve_config(spec, plan, accelerator_type="L4", runtime_env=runtime_env)
    assert rendered == {"applications": [{
        "name": "llm",
        "import_path": "ray.serve.llm:build_openai_app",
        "route_prefix": "/",
        "args": {"llm_configs": [{
            "model_loading_config": {"model_id": "ft-model", "model_source": BASE},
            "accelerator_type": "L4",
            "engine_kwargs": {"max_model_len": 8192, "tensor_parallel_size": 1, "pipeline_parallel_size": 1,
                              "enable_prefix_caching": True, "enable_chunked_prefill": True,
                              "max_num_batched_tokens": 8192, "gpu_memory_utilization": 0.9,
                              "enable_lora": True, "max_lora_rank": 16, "max_loras": 8},
            "deployment_config": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4,
                                                         "target_ongoing_requests": 32},
                                  "request_router_config": {
                                      "request_router_class": "ray.serve.llm.request_router.PrefixCacheAffinityRouter"}},
            "lora_config": {"dynamic_lora_loading_path": BUCKET, "max_num_adapters_per_replica": 8},
            "runtime_env": {"env_vars": {"AWS_REGION": "us-west-2"}},
        }]},
    }]}
    config = rendered["applications"][0]["args"]["llm_configs"][0]
    assert list(config) == ["model_loading_config", "accelerator_type", "engine_kwargs", "deployment_config",
                            "lora_config", "runtime_env"]
    assert config["runtime_env"] is not runtime_env  # the caller's dict is not shared


@pytest.mark.parametrize("per_replica", [1, 4, 16, 256])
def test_max_loras_equals_max_num_adapters_per_replica(per_replica):
    spec = make_spec([{"name": "viggo", "uri": f"{BUCKET}/viggo"}], lora={"maxAdaptersPerReplica": per_replica})
    config = _llm_config(spec, resolve_adapters(spec, {}, {}))
    assert config["engine_kwargs"]["max_loras"] == config["lora_config"]["max_num_adapters_per_replica"] \
        == per_replica


def test_no_lora_config_when_no_adapter_is_served():
    spec = make_spec([{"name": "viggo", "fineTuneRef": {"name": "viggo-ft"}}])
    config = _llm_config(spec, resolve_adapters(spec, {"viggo-ft": running()}, {}))
    assert "lora_config" not in config
    # the engine keeps LoRA on while adapters are configured, so the first one to arrive needs no engine restart
    assert config["engine_kwargs"]["enable_lora"] is True


def test_no_lora_engine_args_without_adapters():
    config = _llm_config(make_spec(), resolve_adapters(make_spec(), {}, {}))
    assert "lora_config" not in config
    assert not {"enable_lora", "max_lora_rank", "max_loras"} & set(config["engine_kwargs"])


@pytest.mark.parametrize("max_rank, rendered", [(1, 8), (8, 8), (10, 16), (64, 64), (65, 128), (256, 256)])
def test_max_lora_rank_is_rounded_up_to_a_rank_vllm_accepts(max_rank, rendered):
    spec = make_spec([{"name": "viggo", "uri": f"{BUCKET}/viggo"}], lora={"maxRank": max_rank})
    assert engine_kwargs(spec)["max_lora_rank"] == rendered


@pytest.mark.parametrize("scaling, to_zero", [
    ({"minReplicas": 0, "maxReplicas": 3, "targetOngoingRequests": 8}, {"downscale_to_zero_delay_s": 600}),
    ({"minReplicas": 0, "maxReplicas": 1, "targetOngoingRequests": 8, "scaleToZeroDelaySeconds": 120},
     {"downscale_to_zero_delay_s": 120}),
    ({"minReplicas": 2, "maxReplicas": 2, "targetOngoingRequests": 64}, {}),   # never idles to zero: no delay
])
def test_autoscaling_maps_to_ray_serve_fields(scaling, to_zero):
    config = _llm_config(make_spec(autoscaling=scaling), resolve_adapters(make_spec(), {}, {}))
    assert config["deployment_config"]["autoscaling_config"] == {
        "min_replicas": scaling["minReplicas"], "max_replicas": scaling["maxReplicas"],
        "target_ongoing_requests": scaling["targetOngoingRequests"], **to_zero}


@pytest.mark.parametrize("scaling, message", [
    ({"minReplicas": 1, "scaleToZeroDelaySeconds": 60}, "scaleToZeroDelaySeconds applies only with"),
    ({"minReplicas": 0, "scaleToZeroDelaySeconds": -1}, "scaleToZeroDelaySeconds"),
])
def test_scale_to_zero_delay_needs_min_replicas_zero(scaling, message):
    with pytest.raises(ValueError, match=message):
        make_spec(autoscaling={"maxReplicas": 2, **scaling})



PREFIX_ROUTER = {"request_router_class": "ray.serve.llm.request_router.PrefixCacheAffinityRouter"}


@pytest.mark.parametrize("routing, scaling, effective", [
    (None, {"minReplicas": 1, "maxReplicas": 1}, "default"),         # one replica: nothing to choose between
    (None, {"minReplicas": 1, "maxReplicas": 2}, "prefixAffinity"),  # maxReplicas counts, not minReplicas
    (None, {"minReplicas": 0, "maxReplicas": 4}, "prefixAffinity"),
    (None, {"minReplicas": 3, "maxReplicas": 3}, "prefixAffinity"),
    ("default", {"minReplicas": 1, "maxReplicas": 4}, "default"),
    ("prefixAffinity", {"minReplicas": 1, "maxReplicas": 1}, "prefixAffinity"),
])
def test_routing_defaults_to_prefix_affinity_with_more_than_one_replica(routing, scaling, effective):
    spec = make_spec(autoscaling=scaling, **({"routing": routing} if routing else {}))
    assert serving_routing(spec) == effective
    deployment = _llm_config(spec, resolve_adapters(spec, {}, {}))["deployment_config"]
    if effective == "prefixAffinity":
        assert deployment["request_router_config"] == PREFIX_ROUTER
    else:   # Ray Serve's own router: nothing rendered, so Ray's default applies
        assert "request_router_config" not in deployment


def test_switching_scale_to_zero_makes_a_new_cluster_other_autoscaling_changes_do_not():
    """KubeRay keeps a running cluster's worker-group bounds, which the Ray autoscaler reads: a switch to or from
    minReplicas 0 must reach them through a new cluster. Fingerprints without scale to zero stay as they were."""
    def fingerprint(**scaling):
        return cluster_fingerprint(make_spec(autoscaling={"maxReplicas": 4, **scaling}))
    assert fingerprint(minReplicas=0) != fingerprint(minReplicas=1)
    assert fingerprint(minReplicas=0) == fingerprint(minReplicas=0, scaleToZeroDelaySeconds=60)
    assert fingerprint(minReplicas=1) == fingerprint(minReplicas=2) == cluster_fingerprint(make_spec())


def test_routing_change_keeps_the_ray_cluster():
    """The router lives in serveConfigV2 only: switching it rolls out in place, like an adapter change."""
    assert cluster_fingerprint(make_spec(routing="default")) == cluster_fingerprint(make_spec(routing="prefixAffinity"))


def test_routing_rejects_unknown_values():
    with pytest.raises(ValueError, match="routing"):
        make_spec(routing="roundRobin")


def test_autoscaling_defaults():
    config = _llm_config(make_spec(), resolve_adapters(make_spec(), {}, {}))
    assert config["deployment_config"]["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 1,
                                                                 "target_ongoing_requests": 16}


def test_engine_kwargs_unset_optionals_are_left_out_and_extra_args_apply_last():
    spec = make_spec(engine={"maxModelLen": None, "enablePrefixCaching": False, "tensorParallelSize": 2,
                             "extraEngineArgs": {"max_num_seqs": 64, "tensor_parallel_size": 4,
                                                 "dtype": "bfloat16"}})
    assert engine_kwargs(spec) == {"tensor_parallel_size": 4, "pipeline_parallel_size": 1,
                                   "enable_prefix_caching": False, "enable_chunked_prefill": True,
                                   "dtype": "bfloat16", "max_num_seqs": 64}


@pytest.mark.parametrize("key", ["enable_lora", "max_lora_rank", "max_loras"])
def test_extra_engine_args_may_not_set_lora_arguments(key):
    spec = make_spec([{"name": "viggo", "uri": f"{BUCKET}/viggo"}], engine={"extraEngineArgs": {key: 8}})
    with pytest.raises(ServeConfigError, match=f"may not set {key}"):
        serve_config(spec, resolve_adapters(spec, {}, {}), accelerator_type="L4", runtime_env={})


@pytest.mark.parametrize("source, rendered", [
    (BASE, BASE),
    ("s3://ml-artifacts/models/qwen2.5-7b", "s3://ml-artifacts/models/qwen2.5-7b"),
    ("gs://ml-artifacts/models/qwen2.5-7b/", "gs://ml-artifacts/models/qwen2.5-7b/"),
    ("pvc://models/qwen2.5-7b/", "/mnt/llmops/pvc/models/qwen2.5-7b"),
])
def test_model_source(source, rendered):
    spec = make_spec(model={"source": source})
    config = _llm_config(spec, resolve_adapters(spec, {}, {}))
    assert config["model_loading_config"] == {"model_id": "ft-model", "model_source": rendered}


def test_accelerator_type_and_empty_runtime_env():
    spec = make_spec()
    config = _llm_config(spec, resolve_adapters(spec, {}, {}), accelerator_type="A100-80G", runtime_env={})
    assert config["accelerator_type"] == "A100-80G"
    assert "runtime_env" not in config


# ---- what needs a new cluster -------------------------------------------------------------------------------------
ADAPTERS = [{"name": "viggo", "uri": f"{BUCKET}/viggo"}]


@pytest.mark.parametrize("changes", [
    {"adapters": [{"name": "viggo", "uri": f"{BUCKET}/viggo"}, {"name": "e2e", "fineTuneRef": {"name": "e2e-ft"}}]},
    {"adapters": [gated("nlg", uri="gs://other/nlg")]},
    {"lora": {"dynamicLoadingPath": BUCKET}},
    {"autoscaling": {"minReplicas": 2, "maxReplicas": 8, "targetOngoingRequests": 4}},   # (minReplicas 0: below)
    {"modelId": "viggo-model"},
    {"upgradeStrategy": "None"},
    {"suspend": True},
    {"lora": {"maxRank": 60}},  # rounds to the same engine rank, 64
    {"engine": {"maxModelLen": 4096, "enableChunkedPrefill": True}},  # defaults written out
    {"resources": {"workers": 3}},  # the worker count follows autoscaling
])
def test_fingerprint_ignores_in_place_changes(changes):
    before = make_spec(ADAPTERS)
    after = make_spec(**{"adapters": ADAPTERS, **changes})
    assert cluster_fingerprint(after) == cluster_fingerprint(before)


@pytest.mark.parametrize("changes", [
    {"model": {"source": "Qwen/Qwen2.5-14B-Instruct"}},
    {"engine": {"maxModelLen": 8192}},
    {"engine": {"tensorParallelSize": 2}},
    {"engine": {"extraEngineArgs": {"max_num_seqs": 64}}},
    {"lora": {"maxRank": 128}},
    {"lora": {"maxAdaptersPerReplica": 8}},
    {"resources": {"accelerator": "H100"}},
    {"resources": {"gpusPerWorker": 2}},
    {"resources": {"memoryPerWorker": "64Gi"}},
    {"resources": {"nodeSelector": {"pool": "l4-spot"}}},
    {"image": "registry.example/ray-llm:custom"},
    {"runtimeEnv": {"envVars": {"VLLM_USE_V1": "1"}}},
    {"secrets": {"storage": {"name": "s3-creds"}}},
    {"adapters": None},  # LoRA off: the engine restarts without enable_lora
])
def test_fingerprint_changes_with_the_cluster(changes):
    before = make_spec(ADAPTERS)
    after = make_spec(**{"adapters": ADAPTERS, **changes})
    assert cluster_fingerprint(after) != cluster_fingerprint(before)


def test_fingerprint_ignores_lora_limits_without_adapters():
    assert cluster_fingerprint(make_spec(lora={"maxRank": 128, "maxAdaptersPerReplica": 2})) \
        == cluster_fingerprint(make_spec())


def test_fingerprint_is_short_and_stable():
    fingerprint = cluster_fingerprint(make_spec(ADAPTERS))
    assert len(fingerprint) == 12 and int(fingerprint, 16) >= 0
    assert fingerprint == cluster_fingerprint(make_spec(ADAPTERS))
