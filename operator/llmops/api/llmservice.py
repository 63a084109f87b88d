"""LLMService: an OpenAI-compatible endpoint (ray.serve.llm) for a base model and its LoRA adapters."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from .batchinference import METRICS, Engine
from .common import (
    K8S_NAME_PATTERN,
    MAX_LIST,
    MAX_STRING,
    MODEL_SOURCE_PATTERN,
    ApiModel,
    LocalRef,
    PVC_CACHE_RULE,
    ModelCache,
    Resources,
    StatusBase,
    WorkloadControls,
    cel,
    no_cache_for_pvc,
    exactly_one,
    validations,
)

# Gateway API's Hostname (a wildcard only as the first label).
HOSTNAME_PATTERN = r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
SERVE_LORA_SCHEMES = ("s3://", "gs://", "abfss://", "azure://")
ADAPTER_URI_PATTERN = r"^(s3://|gs://|abfss://|azure://|pvc://)[^\s]+$"


class ServedModel(ApiModel):
    model_config = validations(cel(PVC_CACHE_RULE, "a pvc:// source is read in place from its claim; unset cache",
                                   field_path=".cache"))

    source: str = Field(pattern=MODEL_SOURCE_PATTERN, max_length=MAX_STRING)
    """Base model (Hugging Face id, s3://, gs:// or pvc://)."""
    cache: ModelCache | None = None
    """Download the model once into a claim every replica mounts read-only, before the RayService starts. Unset:
    every replica downloads it."""

    @model_validator(mode="after")
    def _cache_not_for_pvc(self) -> ServedModel:
        no_cache_for_pvc(self.source, self.cache, "spec.model")
        return self


class Gate(ApiModel):
    batch_inference_ref: LocalRef
    """The BatchInference whose metric decides."""
    metric: Literal["exactMatch", "functionNameAccuracy", "attributeF1"] = "exactMatch"
    """Metric from that BatchInference's status.metrics."""
    minimum: float = Field(ge=0, le=1)
    """Serve the adapter only when the metric is at least this."""


class Adapter(ApiModel):
    model_config = validations(exactly_one(["fineTuneRef", "uri"], "adapters[]"))

    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$", max_length=63)
    """Adapter id: clients request it as model="<modelId>:<name>"."""
    fine_tune_ref: LocalRef | None = None
    """Serve the adapter this FineTune produced (waits for it)."""
    uri: str | None = Field(default=None, pattern=ADAPTER_URI_PATTERN, max_length=MAX_STRING)
    """Adapter folder in object storage (s3://, gs://, abfss://, azure://)."""
    gate: Gate | None = None
    """Serve only once an evaluation meets a minimum."""

    @model_validator(mode="after")
    def _one_source(self) -> Adapter:
        if (self.fine_tune_ref is None) == (self.uri is None):
            raise ValueError(f"spec.adapters[{self.name}]: set exactly one of fineTuneRef, uri")
        return self


class Lora(ApiModel):
    dynamic_loading_path: str | None = Field(default=None, pattern=r"^(s3://|gs://|abfss://|azure://)[^\s]+$",
                                             max_length=MAX_STRING)
    """Common parent of all adapters. Unset: derived from the adapters' locations."""
    max_adapters_per_replica: int = Field(default=4, ge=1, le=256)
    """Adapters a replica keeps loaded (also the engine's max_loras)."""
    max_rank: int = Field(default=64, ge=1, le=256)
    """Largest LoRA rank the engine accepts."""


SCALE_TO_ZERO_DELAY_SECONDS = 600
"""How long a model with autoscaling.minReplicas 0 stays idle before its last replica stops, unless
autoscaling.scaleToZeroDelaySeconds says otherwise (Ray Serve's own default for downscale_delay_s)."""


class Autoscaling(ApiModel):
    model_config = validations(
        cel("!has(self.minReplicas) || !has(self.maxReplicas) || self.minReplicas <= self.maxReplicas",
            "autoscaling.minReplicas must not exceed autoscaling.maxReplicas"),
        cel("!has(self.scaleToZeroDelaySeconds) || (has(self.minReplicas) && self.minReplicas == 0)",
            "autoscaling.scaleToZeroDelaySeconds applies only with autoscaling.minReplicas 0: set minReplicas to 0 "
            "to scale to zero, or remove scaleToZeroDelaySeconds", field_path=".scaleToZeroDelaySeconds"),
    )

    min_replicas: int = Field(default=1, ge=0, le=512)
    """Fewest model replicas. 0 scales to zero: after scaleToZeroDelaySeconds without a request the last replica
    stops and the Ray autoscaler removes its GPU worker pods; the next request starts them again and waits for
    the model to load (a cold start). The status reads ScaledToZero meanwhile."""
    max_replicas: int = Field(default=1, ge=1, le=512)
    """Most model replicas."""
    target_ongoing_requests: int = Field(default=16, ge=1, le=4096)
    """Requests in flight per replica that autoscaling aims for."""
    scale_to_zero_delay_seconds: int | None = Field(default=None, ge=0, le=604800)
    """With minReplicas 0: seconds without a request before the last replica stops (Ray Serve's
    downscale_to_zero_delay_s). Unset: 600. The Ray autoscaler removes the idle GPU worker pod about a minute
    later. Only valid with minReplicas 0."""

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("spec.autoscaling.minReplicas must not exceed spec.autoscaling.maxReplicas")
        if self.scale_to_zero_delay_seconds is not None and self.min_replicas != 0:
            raise ValueError("autoscaling.scaleToZeroDelaySeconds applies only with autoscaling.minReplicas 0: set "
                             "minReplicas to 0 to scale to zero, or remove scaleToZeroDelaySeconds")
        return self

    @property
    def scales_to_zero(self) -> bool:
        return self.min_replicas == 0

    @property
    def scale_to_zero_delay(self) -> int:
        """Seconds idle before the last replica stops (with minReplicas 0)."""
        if self.scale_to_zero_delay_seconds is None:
            return SCALE_TO_ZERO_DELAY_SECONDS
        return self.scale_to_zero_delay_seconds


class GatewayRef(ApiModel):
    name: str = Field(pattern=K8S_NAME_PATTERN, max_length=253)
    """The Gateway (gateway.networking.k8s.io/v1) the route attaches to."""
    namespace: str | None = Field(default=None, pattern=K8S_NAME_PATTERN, max_length=63)
    """Its namespace. Unset: this resource's namespace. A Gateway elsewhere must admit routes from this namespace
    (its listeners' allowedRoutes)."""
    section_name: str | None = Field(default=None, pattern=K8S_NAME_PATTERN, max_length=253)
    """One listener of that Gateway (e.g. https). Unset: every listener that admits the route."""


class ApiKey(ApiModel):
    secret_ref: LocalRef
    """Secret in this namespace holding the accepted keys, one per data key (the key's name identifies the client).
    The operator never reads it: the route and the policy name it, and the Gateway reads it."""
    enforcement: Literal["EnvoyGateway"] = "EnvoyGateway"
    """Who checks the key. EnvoyGateway: the operator attaches an Envoy Gateway SecurityPolicy (apiKeyAuth) to the
    route; clients send the key in the x-api-key header. Ray Serve LLM's OpenAI app checks no key itself, so the
    route is created only together with that policy: without Envoy Gateway's SecurityPolicy API the service is
    Stalled and nothing is exposed. Other Gateways: leave apiKey unset and attach that Gateway's own policy to the
    route (docs/llmservice.md)."""


class Expose(ApiModel):
    gateway: GatewayRef
    """The Gateway that carries the traffic (created and run by the cluster's Gateway implementation)."""
    hostnames: list[Annotated[str, Field(pattern=HOSTNAME_PATTERN, max_length=253)]] | None = Field(
        default=None, max_length=16)
    """Host names the route answers for (e.g. llm.example.com). Unset: the Gateway's listeners decide."""
    api_key: ApiKey | None = None
    """Require an API key, kept in a Secret. Unset: anyone who reaches the Gateway can call the model."""


class LLMServiceSpec(WorkloadControls):
    model_config = validations(
        cel("!has(self.adapters) || self.adapters.all(a, self.adapters.exists_one(b, b.name == a.name))",
            "adapters[].name must be unique", field_path=".adapters"),
    )

    model_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=128)
    """The id clients request (e.g. ft-model); adapters are "<modelId>:<adapter>"."""
    model: ServedModel
    """The base model."""
    adapters: list[Adapter] | None = Field(default=None, max_length=MAX_LIST)
    """LoRA adapters to serve beside the base model."""
    lora: Lora = Field(default_factory=Lora)
    """Multi-LoRA settings."""
    engine: Engine = Field(default_factory=Engine)
    """vLLM engine settings."""
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    """Replica autoscaling."""
    resources: Resources = Field(default_factory=Resources)
    """GPU workers: per-worker size and node pool; the worker group autoscales up to what replicas need."""
    routing: Literal["default", "prefixAffinity"] | None = None
    """How Ray Serve picks a replica for each request. prefixAffinity: Ray Serve LLM's PrefixCacheAffinityRouter,
    which sends a prompt to the replica that already served its longest prefix (while replicas are evenly loaded),
    so vLLM's prefix cache is reused; suits many requests sharing a long system prompt or few-shot header.
    default: Ray Serve's own router (the less busy of two random replicas). Unset: prefixAffinity when
    autoscaling.maxReplicas is above 1, default otherwise (with one replica there is no choice to make). Changing
    it rewrites only serveConfigV2 (no new Ray cluster). Its effect on latency has not been measured by this
    project."""
    expose: Expose | None = None
    """Reach the endpoint from outside the cluster: a Gateway API HTTPRoute from a Gateway to the RayService's serve
    Service (needs the Gateway API CRDs, gateway.networking.k8s.io/v1). Unset: in-cluster only (status.endpoint)."""
    upgrade_strategy: Literal["NewCluster", "None"] = "NewCluster"
    """How a change to model, engine or resources rolls out: NewCluster (zero downtime, needs twice the GPUs
    while it runs) or None (in place). Adapter changes always apply in place."""

    @model_validator(mode="after")
    def _unique_adapters(self) -> LLMServiceSpec:
        names = [a.name for a in self.adapters or []]
        if len(names) != len(set(names)):
            raise ValueError("spec.adapters[].name must be unique")
        return self


class AdapterState(ApiModel):
    name: str
    """The adapter's name in spec.adapters."""
    uri: str | None = None
    """Where it is loaded from, once known."""
    state: str
    """Serving, WaitingForFineTune, WaitingForEvaluation, GateNotMet, Unsupported or Failed."""
    message: str | None = None
    """Why it is in that state, and what to do."""


class LLMServiceStatus(StatusBase):
    ray_service_name: str | None = None
    """The RayService that serves it."""
    endpoint: str | None = None
    """In-cluster OpenAI-compatible base URL."""
    models: list[str] | None = None
    """Model ids a client can request."""
    adapters: list[AdapterState] | None = None
    """Each adapter of spec.adapters: served, or why not yet."""
    routing: str | None = None
    """The request router in effect (default or prefixAffinity), after the default for spec.routing is applied."""
    route_name: str | None = None
    """The HTTPRoute that exposes the endpoint (spec.expose), once written."""
    api_key_policy_name: str | None = None
    """The Envoy Gateway SecurityPolicy that checks the API key on that route (spec.expose.apiKey), once written."""


__all__ = ["METRICS", "SCALE_TO_ZERO_DELAY_SECONDS", "SERVE_LORA_SCHEMES", "LLMServiceSpec", "LLMServiceStatus"]
