"""Ray-venv test: every rendered `llm_configs` entry is one Ray Serve 2.60's own models accept.

Run with the Ray venv (`.venv-ray/bin/python -m pytest tests/unit/payloads/test_serve_config_ray.py`); skipped
where Ray is not installed. LLMConfig, ModelLoadingConfig and LoraConfig forbid unknown fields, but Ray's
DeploymentConfig and AutoscalingConfig silently drop them (a misspelt autoscaling field would just be lost), so
every rendered key is also checked against the fields of the model that reads it. `engine_kwargs` is an open
dict to Ray (vLLM checks it when the engine starts), so its keys are not covered here. The request router's class
path and RequestRouterConfig are the same in Ray 2.57.0 (the images) as in 2.60 (their sources compared).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray")

# Internal paths (they may move between Ray releases; FACTS.md). Imported unguarded on purpose: with Ray
# installed, a moved model must fail this test rather than skip it.
from ray.llm._internal.common.utils.lora_utils import get_lora_id  # noqa: E402
from ray.llm._internal.serve.core.configs.llm_config import LLMConfig, LoraConfig, ModelLoadingConfig  # noqa: E402
from ray.serve._private.config import DeploymentConfig  # noqa: E402
from ray.serve.config import AutoscalingConfig, RequestRouterConfig  # noqa: E402

from llmops.api.batchinference import BatchInferenceStatus  # noqa: E402
from llmops.api.finetune import FineTuneStatus  # noqa: E402
from llmops.api.llmservice import LLMServiceSpec  # noqa: E402
from llmops.builders.serving import resolve_adapters, serve_config  # noqa: E402
from llmops.settings import DEFAULT_PROFILES, RAY_VERSION  # noqa: E402

BUCKET = "s3://ml-artifacts/viggo/adapters"
READY = {"phase": "Succeeded", "conditions": [{"type": "Ready", "status": "True", "reason": "Succeeded"}]}
FINETUNES = {"viggo-ft": FineTuneStatus.read({**READY, "adapter": {"uri": f"{BUCKET}/viggo", "rank": 8}}),
             "e2e-ft": FineTuneStatus.read({"phase": "Running", "conditions": [
                 {"type": "Ready", "status": "False", "reason": "Running"}]})}
EVALUATIONS = {"viggo-eval": BatchInferenceStatus.read({**READY, "metrics": {"exactMatch": 0.86, "rows": 714}})}

SPECS: dict[str, dict[str, Any]] = {
    "base-only": {"modelId": "qwen", "model": {"source": "Qwen/Qwen2.5-7B-Instruct"}},
    "gated-finetune": {
        "modelId": "ft-model", "model": {"source": "Qwen/Qwen2.5-7B-Instruct"},
        "adapters": [{"name": "viggo", "fineTuneRef": {"name": "viggo-ft"},
                      "gate": {"batchInferenceRef": {"name": "viggo-eval"}, "minimum": 0.8}},
                     {"name": "e2e", "fineTuneRef": {"name": "e2e-ft"}}],
        "lora": {"maxAdaptersPerReplica": 8, "maxRank": 16},
        "autoscaling": {"minReplicas": 0, "maxReplicas": 4, "targetOngoingRequests": 32},
    },
    "scale-to-zero-after-two-minutes": {
        "modelId": "qwen", "model": {"source": "Qwen/Qwen2.5-7B-Instruct"},
        "autoscaling": {"minReplicas": 0, "maxReplicas": 1, "scaleToZeroDelaySeconds": 120},
    },
    "adapters-waiting": {
        "modelId": "ft-model", "model": {"source": "s3://ml-artifacts/models/qwen2.5-7b"},
        "adapters": [{"name": "e2e", "fineTuneRef": {"name": "e2e-ft"}}],
    },
    "fixed-path-gs-tuned-engine": {
        "modelId": "ft-model", "model": {"source": "pvc://models/qwen2.5-7b"},
        "adapters": [{"name": "viggo", "uri": "gs://ml-artifacts/adapters/viggo"}],
        "lora": {"dynamicLoadingPath": "gs://ml-artifacts/adapters/"},
        "engine": {"maxModelLen": 8192, "tensorParallelSize": 2, "maxNumBatchedTokens": 8192,
                   "gpuMemoryUtilization": 0.92, "extraEngineArgs": {"max_num_seqs": 128}},
    },
}
RUNTIME_ENV = {"env_vars": {"AWS_REGION": "us-west-2", "HF_HUB_ENABLE_HF_TRANSFER": "1"}}


# Every dict the operator renders inside an llm_configs entry, and the Ray model that reads it.
READERS = {(): LLMConfig, ("model_loading_config",): ModelLoadingConfig, ("lora_config",): LoraConfig,
           ("deployment_config",): DeploymentConfig, ("deployment_config", "autoscaling_config"): AutoscalingConfig,
           ("deployment_config", "request_router_config"): RequestRouterConfig}
# RequestRouterConfig imports (and pickles) its router class when built, and the LLM routers' modules need vLLM.
# Ray builds it from an already pickled class the same way when it reads a stored config: this stands in for that
# pickle, so the model's own validation runs on CPU; the class path is checked against Ray's source below.
NOT_IMPORTED = b"router class not imported on CPU"


def on_cpu(rendered: dict[str, Any]) -> dict[str, Any]:
    """A rendered llm_configs entry with its request_router_config dict built into Ray's RequestRouterConfig (which
    validates it) without importing the router; LLMConfig validates its deployment_config as a DeploymentConfig."""
    deployment = dict(rendered["deployment_config"])
    if "request_router_config" in deployment:
        deployment["request_router_config"] = RequestRouterConfig.from_serialized_request_router_cls(
            deployment["request_router_config"], NOT_IMPORTED)
    return {**rendered, "deployment_config": deployment}


def ray_deployment_config(rendered: dict[str, Any]) -> DeploymentConfig:
    """The DeploymentConfig Ray builds from a rendered llm_configs entry."""
    return DeploymentConfig(**LLMConfig.model_validate(on_cpu(rendered)).deployment_config)


def unknown_fields(rendered: dict[str, Any]) -> dict[str, set[str]]:
    """Keys Ray has no field for, per rendered dict."""
    unknown = {}
    for path, model in READERS.items():
        part = rendered
        for key in path:
            part = part.get(key, {})
        if extra := set(part) - set(model.model_fields):
            unknown[".".join(path) or "llm_config"] = extra
    return unknown


def render(name: str, accelerator_type: str = "L4") -> tuple[dict[str, Any], Any]:
    spec = LLMServiceSpec.model_validate(SPECS[name])
    plan = resolve_adapters(spec, FINETUNES, EVALUATIONS)
    return serve_config(spec, plan, accelerator_type=accelerator_type, runtime_env=RUNTIME_ENV), plan


def test_the_venv_runs_the_ray_the_operator_deploys():
    assert ray.__version__ == RAY_VERSION


def serving_args_fields() -> set[str]:
    """Fields of Ray's LLMServingArgs (build_openai_app's argument), read from its source: importing the
    module needs vLLM or SGLang."""
    source = Path(ray.__file__).parent / "llm/_internal/serve/core/ingress/builder.py"
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.ClassDef) and node.name == "LLMServingArgs":
            return {n.target.id for n in node.body if isinstance(n, ast.AnnAssign)}
    raise AssertionError(f"LLMServingArgs is no longer defined in {source}")


def test_application_args_are_build_openai_app_arguments():
    app = render("gated-finetune")[0]["applications"][0]
    assert set(app["args"]) <= serving_args_fields()
    assert "llm_configs" in serving_args_fields()


@pytest.mark.parametrize("name", sorted(SPECS))
def test_rendered_llm_configs_validate_against_ray(name):
    app = render(name)[0]["applications"][0]
    assert app["import_path"] == "ray.serve.llm:build_openai_app"
    assert len(app["args"]["llm_configs"]) == 1
    for rendered in app["args"]["llm_configs"]:
        assert unknown_fields(rendered) == {}
        config = LLMConfig.model_validate(on_cpu(rendered))
        assert config.model_id == rendered["model_loading_config"]["model_id"]
        assert config.engine_kwargs == rendered["engine_kwargs"]
        assert config.deployment_config == on_cpu(rendered)["deployment_config"]
        if "lora_config" in rendered:
            assert config.lora_config.dynamic_lora_loading_path == rendered["lora_config"]["dynamic_lora_loading_path"]
            # Ray multiplexes exactly as many adapters per replica as the engine may hold
            assert config.multiplex_config().max_num_models_per_replica == rendered["engine_kwargs"]["max_loras"]
        else:
            assert config.lora_config is None


@pytest.mark.parametrize("where", [(), ("model_loading_config",), ("lora_config",), ("deployment_config",),
                                   ("deployment_config", "autoscaling_config"),
                                   ("deployment_config", "request_router_config")])
def test_an_unknown_field_is_caught_at_every_level(where):
    """Guards the test above: a name Ray does not know fails, whether or not Ray's own model refuses it."""
    rendered = render("gated-finetune")[0]["applications"][0]["args"]["llm_configs"][0]
    target = rendered
    for key in where:
        target = target[key]
    target["target_num_ongoing_requests_per_replica"] = 1  # a retired Ray Serve field name
    assert unknown_fields(rendered) == {".".join(where) or "llm_config": {"target_num_ongoing_requests_per_replica"}}
    if READERS[where] not in (DeploymentConfig, AutoscalingConfig, RequestRouterConfig):
        with pytest.raises(ValueError):
            LLMConfig.model_validate(on_cpu(rendered))


def test_ray_reads_the_rendered_autoscaling_values():
    rendered = render("gated-finetune")[0]["applications"][0]["args"]["llm_configs"][0]
    config = ray_deployment_config(rendered)
    scaling = config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (0, 4, 32)
    assert scaling.downscale_to_zero_delay_s == 600   # minReplicas 0 without scaleToZeroDelaySeconds
    assert scaling.initial_replicas is None   # Ray starts min_replicas (none) until the first request


def test_ray_reads_the_scale_to_zero_delay():
    rendered = render("scale-to-zero-after-two-minutes")[0]["applications"][0]["args"]["llm_configs"][0]
    scaling = ray_deployment_config(rendered).autoscaling_config
    assert (scaling.min_replicas, scaling.downscale_to_zero_delay_s) == (0, 120)


def test_ray_loads_each_served_adapter_from_the_folder_the_plan_names():
    (config, plan) = render("gated-finetune")
    rendered = config["applications"][0]["args"]["llm_configs"][0]
    path = LLMConfig.model_validate(on_cpu(rendered)).lora_config.dynamic_lora_loading_path
    assert plan.served == [("viggo", f"{BUCKET}/viggo")]
    for model in plan.models[1:]:
        # what Ray's LoRA loader does with the requested model id: "<path>/<everything after the first colon>"
        assert (f"{path}/{get_lora_id(model)}", model) in [(uri, f"ft-model:{id_}") for id_, uri in plan.served]


@pytest.mark.parametrize("profile", sorted(DEFAULT_PROFILES))
def test_every_default_accelerator_profile_is_a_ray_accelerator_type(profile):
    rendered = render("base-only", DEFAULT_PROFILES[profile].ray_accelerator_type)[0]
    LLMConfig.model_validate(on_cpu(rendered["applications"][0]["args"]["llm_configs"][0]))


@pytest.mark.parametrize("path, ok", [
    ("s3://b/a", True), ("gs://b/a", True), ("abfss://c@acct.dfs.core.windows.net/a", True), ("azure://c/a", True),
    ("pvc://claim/a", False), ("/mnt/llmops/pvc/claim/a", False),
])
def test_ray_loading_path_schemes_match_the_operator_rule(path, ok):
    """The operator marks pvc:// adapters Unsupported because Ray's LoraConfig refuses anything but these."""
    if ok:
        assert LoraConfig(dynamic_lora_loading_path=path + "/").dynamic_lora_loading_path == path
    else:
        with pytest.raises(ValueError):
            LoraConfig(dynamic_lora_loading_path=path)


def class_defined_in_ray_source(import_path: str) -> bool:
    """Whether Ray's installed source defines the class an import path names, split the way Ray's
    import_module_and_attr splits it ("module:attr", else at the last dot); read, not imported (needs vLLM)."""
    module, _, attr = import_path.partition(":") if ":" in import_path else import_path.rpartition(".")
    source = Path(ray.__file__).parent.parent.joinpath(*module.split(".")).with_suffix(".py")
    if not source.exists():
        return False
    return any(isinstance(n, ast.ClassDef) and n.name == attr for n in ast.walk(ast.parse(source.read_text())))


def test_prefix_affinity_names_ray_serve_llms_router():
    """The ViGGO-shaped spec (more than one replica) renders Ray's PrefixCacheAffinityRouter into deployment_config,
    and Ray's own RequestRouterConfig and DeploymentConfig accept it."""
    rendered = render("gated-finetune")[0]["applications"][0]["args"]["llm_configs"][0]
    router = rendered["deployment_config"]["request_router_config"]
    assert router == {"request_router_class": "ray.serve.llm.request_router.PrefixCacheAffinityRouter"}
    assert class_defined_in_ray_source(router["request_router_class"])
    config = ray_deployment_config(rendered).request_router_config
    assert config.request_router_class == router["request_router_class"]
    assert not config.is_default_request_router()
    assert config.request_router_kwargs == {}   # the router's own defaults


def test_a_misspelt_router_class_is_caught():
    """Guards the test above: a class Ray does not define is not found."""
    assert not class_defined_in_ray_source("ray.serve.llm.request_router.PrefixAffinityRouter")
    assert not class_defined_in_ray_source("ray.serve.llm.no_such_module.PrefixCacheAffinityRouter")


def test_default_routing_leaves_rays_own_router():
    rendered = render("base-only")[0]["applications"][0]["args"]["llm_configs"][0]
    assert "request_router_config" not in rendered["deployment_config"]
    assert ray_deployment_config(rendered).request_router_config.is_default_request_router()
