"""BatchInference: offline generation over a dataset with ray.data.llm (vLLM), plus evaluation metrics."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from .common import (
    MAX_MAP,
    MAX_STRING,
    MAX_TEXT,
    MODEL_SOURCE_PATTERN,
    STORAGE_URI_PATTERN,
    ApiModel,
    JobControls,
    LocalRef,
    PVC_CACHE_RULE,
    ModelCache,
    Resources,
    JobStatus,
    cel,
    no_cache_for_pvc,
    exactly_one,
    validations,
)

METRICS = ("exactMatch", "functionNameAccuracy", "attributeF1")


class AdapterRef(ApiModel):
    uri: str = Field(pattern=STORAGE_URI_PATTERN, max_length=MAX_STRING)
    """Adapter folder (with adapter_config.json): s3://, gs:// or pvc://<claim>/<path>."""


class ModelChoice(ApiModel):
    model_config = validations(
        exactly_one(["source", "fineTuneRef"], "model"),
        cel("!has(self.adapter) || has(self.source)", "model.adapter needs model.source; a fineTuneRef brings "
            "its own adapter", field_path=".adapter"),
        cel(PVC_CACHE_RULE, "a pvc:// source is read in place from its claim; unset cache", field_path=".cache"),
    )

    source: str | None = Field(default=None, pattern=MODEL_SOURCE_PATTERN, max_length=MAX_STRING)
    """Base model (Hugging Face id, s3://, gs:// or pvc://)."""
    fine_tune_ref: LocalRef | None = None
    """Use this FineTune's base model and adapter; waits until the FineTune is Ready."""
    adapter: AdapterRef | None = None
    """A LoRA adapter to apply on `source`."""
    cache: ModelCache | None = None
    """Download the base model (`source`, or the FineTune's) once into a claim the workers mount read-only. Unset:
    every worker downloads it."""

    @model_validator(mode="after")
    def _one_model(self) -> ModelChoice:
        if (self.source is None) == (self.fine_tune_ref is None):
            raise ValueError("set exactly one of spec.model.source, spec.model.fineTuneRef")
        if self.adapter is not None and self.source is None:
            raise ValueError("spec.model.adapter needs spec.model.source; a fineTuneRef brings its own adapter")
        no_cache_for_pvc(self.source, self.cache, "spec.model")
        return self


class Input(ApiModel):
    uri: str = Field(pattern=STORAGE_URI_PATTERN, max_length=MAX_STRING)
    """Dataset file or folder: s3://, gs:// or pvc://<claim>/<path>."""
    format: Literal["jsonl", "parquet", "csv"] = "jsonl"
    """File format."""


class Prompt(ApiModel):
    model_config = validations(
        cel("!(has(self.systemPrompt) && has(self.systemField))",
            "set at most one of prompt.systemPrompt and prompt.systemField"),
    )

    system_prompt: str | None = Field(default=None, max_length=MAX_TEXT)
    """System message shared by every row (good for prefix caching)."""
    system_field: str | None = Field(default=None, max_length=255)
    """Column holding a per-row system message."""
    user_field: str = Field(default="input", max_length=255)
    """Column holding the user message."""

    @model_validator(mode="after")
    def _one_system(self) -> Prompt:
        if self.system_prompt is not None and self.system_field is not None:
            raise ValueError("set at most one of spec.prompt.systemPrompt and spec.prompt.systemField")
        return self


class Sampling(ApiModel):
    temperature: float = Field(default=0.0, ge=0, le=2)
    """Sampling temperature; 0 is greedy (best for exact-match evaluation)."""
    max_tokens: int = Field(default=256, ge=1, le=131072)
    """Maximum generated tokens per row."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    """Nucleus sampling mass."""


class Engine(ApiModel):
    """vLLM engine settings."""

    max_model_len: int | None = Field(default=4096, ge=16, le=1048576)
    """Context length the engine reserves KV cache for."""
    tensor_parallel_size: int = Field(default=1, ge=1, le=16)
    """GPUs per model replica (tensor parallel)."""
    pipeline_parallel_size: int = Field(default=1, ge=1, le=16)
    """Pipeline stages per replica."""
    enable_prefix_caching: bool = True
    """Reuse the KV cache of shared prompt prefixes (the system prompt)."""
    enable_chunked_prefill: bool = True
    """Interleave prefill chunks with decoding."""
    max_num_batched_tokens: int | None = Field(default=None, ge=16)
    """Token budget per engine step. Unset, a BatchInference gets vLLM's offline limit for its GPU (the one vLLM's
    LLM class picks; max_num_seqs likewise, which extraEngineArgs can set) and an LLMService vLLM's serving
    default."""
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    """Fraction of GPU memory vLLM may take."""
    extra_engine_args: dict[str, Any] | None = Field(default=None, max_length=MAX_MAP)
    """Further vLLM engine arguments (snake_case), passed as they are."""


class Output(ApiModel):
    uri: str = Field(pattern=STORAGE_URI_PATTERN, max_length=MAX_STRING)
    """Folder for the generated rows."""
    format: Literal["jsonl", "parquet", "csv"] = "jsonl"
    """File format of the outputs."""


class Evaluation(ApiModel):
    reference_field: str = Field(max_length=255)
    """Column with the expected answer."""
    metrics: list[Literal["exactMatch", "functionNameAccuracy", "attributeF1"]] = Field(
        default=["exactMatch"], min_length=1, max_length=len(METRICS))
    """Metrics to compute: exactMatch (strict), functionNameAccuracy and attributeF1 (order-insensitive
    attribute pairs, for structured outputs such as ViGGO's function(attr[value], ...))."""


class BatchInferenceSpec(JobControls):
    model_config = validations(
        cel("self.resources.gpusPerWorker * self.resources.workers >= "
            "self.engine.tensorParallelSize * self.engine.pipelineParallelSize",
            "resources must hold at least engine.tensorParallelSize x engine.pipelineParallelSize GPUs",
            field_path=".resources"),
    )

    model: ModelChoice
    """The model: a base model, a base model plus adapter, or a FineTune's result."""
    input: Input
    """The rows to run."""
    prompt: Prompt = Field(default_factory=Prompt)
    """How each row becomes chat messages."""
    sampling: Sampling = Field(default_factory=Sampling)
    """Generation settings."""
    engine: Engine = Field(default_factory=Engine)
    """vLLM engine settings (prefix caching and chunked prefill on by default)."""
    concurrency: int = Field(default=1, ge=1, le=512)
    """Engine replicas running in parallel."""
    batch_size: int = Field(default=16, ge=1, le=4096)
    """Rows per batch sent to an engine replica."""
    resources: Resources = Field(default_factory=Resources)
    """GPU workers: count, size and node pool."""
    output: Output
    """Where generated rows go."""
    evaluation: Evaluation | None = None
    """Compare generations against a reference column."""

    @model_validator(mode="after")
    def _enough_gpus(self) -> BatchInferenceSpec:
        needed = self.engine.tensor_parallel_size * self.engine.pipeline_parallel_size
        if self.resources.gpus_per_worker * self.resources.workers < needed:
            raise ValueError("spec.resources must hold at least engine.tensorParallelSize x "
                             f"engine.pipelineParallelSize = {needed} GPUs")
        return self


class BatchMetrics(ApiModel):
    model_config = {"extra": "allow"}

    rows: int | None = None
    """Rows generated."""
    exact_match: float | None = None
    """Share of rows whose output equals the reference exactly."""
    function_name_accuracy: float | None = None
    """Share of rows with the reference's function name (ViGGO-style meaning representations)."""
    attribute_f1: float | None = Field(default=None, alias="attributeF1")
    """F1 of the attributes against the reference's (ViGGO-style meaning representations)."""
    simulated: bool | None = None
    """True when the local plane's data-plane simulator wrote these figures: no model ran, they measure nothing
    about this resource. Absent when the job itself reported them."""


class BatchInferenceStatus(JobStatus):
    output_uri: str | None = Field(default=None, alias="outputURI")
    """Where the generated rows are, once it Succeeded."""
    model_source: str | None = None
    """The base model the run uses (resolved from a FineTune when referenced)."""
    adapter_uri: str | None = Field(default=None, alias="adapterURI")
    """The adapter the run uses, if any."""
    metrics: BatchMetrics | None = None
    """Evaluation metrics over the generated rows."""
