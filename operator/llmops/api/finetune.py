"""FineTune: LoRA (or QLoRA, full) supervised fine-tuning with LLaMA-Factory on Ray."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from .common import (
    MAX_MAP,
    MAX_STRING,
    MODEL_SOURCE_PATTERN,
    ApiModel,
    JobControls,
    PVC_CACHE_RULE,
    ModelCache,
    Resources,
    JobStatus,
    Storage,
    cel,
    no_cache_for_pvc,
    validations,
)

# LLaMA-Factory keys the operator renders itself; `extraArgs` may not set them.
MANAGED_KEYS = frozenset({
    "model_name_or_path", "model_revision", "trust_remote_code", "stage", "do_train", "finetuning_type",
    "lora_rank", "lora_alpha", "lora_dropout", "lora_target", "quantization_bit", "dataset", "eval_dataset",
    "dataset_dir", "template", "cutoff_len", "max_samples", "output_dir", "num_train_epochs", "learning_rate",
    "per_device_train_batch_size", "gradient_accumulation_steps", "lr_scheduler_type", "warmup_ratio", "bf16",
    "fp16", "packing", "neat_packing", "logging_steps", "save_steps", "eval_steps", "eval_strategy",
    "ray_run_name", "ray_storage_path", "ray_storage_filesystem", "ray_num_workers", "resources_per_worker",
    "placement_strategy",
    "ray_init_kwargs", "disable_gradient_checkpointing", "flash_attn", "report_to", "overwrite_output_dir",
    "hf_hub_token", "resume_from_checkpoint",
})


class BaseModelSource(ApiModel):
    model_config = validations(cel(PVC_CACHE_RULE, "a pvc:// source is read in place from its claim; unset cache",
                                   field_path=".cache"))

    source: str = Field(pattern=MODEL_SOURCE_PATTERN, max_length=MAX_STRING)
    """Base model: a Hugging Face id (Qwen/Qwen2.5-7B-Instruct), s3://..., gs://... or pvc://<claim>/<path>."""
    revision: str | None = Field(default=None, max_length=255)
    """Hugging Face revision (branch, tag or commit)."""
    trust_remote_code: bool = False
    """Allow the model's own code from the hub to run."""
    cache: ModelCache | None = None
    """Download the model once into a claim the workers mount read-only (for a Hugging Face id, s3:// or gs://
    source; a pvc:// source is read in place already). Unset: every worker downloads it."""

    @model_validator(mode="after")
    def _cache_not_for_pvc(self) -> BaseModelSource:
        no_cache_for_pvc(self.source, self.cache, "spec.baseModel")
        return self


class Method(ApiModel):
    type: Literal["lora", "qlora", "full"] = "lora"
    """Fine-tuning method: lora (adapter), qlora (4-bit base + adapter) or full."""
    rank: int = Field(default=8, ge=1, le=256)
    """LoRA rank (1-256)."""
    alpha: int | None = Field(default=None, ge=1, le=1024)
    """LoRA alpha; LLaMA-Factory's default (2 x rank) when unset."""
    dropout: float = Field(default=0.0, ge=0.0, le=1.0)
    """LoRA dropout (0-1)."""
    target: str = Field(default="all", max_length=MAX_STRING)
    """Modules to adapt: `all` (every linear layer) or a comma-separated list such as q_proj,v_proj."""


class Columns(ApiModel):
    """Dataset column names, as LLaMA-Factory's dataset_info `columns`."""

    prompt: str | None = Field(default=None, max_length=255)
    query: str | None = Field(default=None, max_length=255)
    response: str | None = Field(default=None, max_length=255)
    system: str | None = Field(default=None, max_length=255)
    history: str | None = Field(default=None, max_length=255)
    messages: str | None = Field(default=None, max_length=255)


class Dataset(ApiModel):
    train: Storage
    """Training data file (JSON or JSONL)."""
    validation: Storage | None = None
    """Validation data file; evaluated every `training.evalSteps`."""
    format: Literal["alpaca", "sharegpt"] = "alpaca"
    """Record format (LLaMA-Factory's `formatting`)."""
    columns: Columns | None = None
    """Column mapping; LLaMA-Factory's defaults for the format when unset."""
    max_samples: int | None = Field(default=None, ge=1)
    """Use at most this many samples per dataset."""
    cutoff_len: int = Field(default=2048, ge=16, le=131072)
    """Maximum tokens per sample (and per packed row)."""


class Training(ApiModel):
    model_config = validations(
        cel("!has(self.sharedPrefix) || !self.sharedPrefix || ((!has(self.packing) || self.packing) && "
            "(!has(self.attention) || self.attention in ['sdpa', 'eager']))",
            "training.sharedPrefix needs packing with a mask: leave packing on and attention unset, sdpa or eager",
            field_path=".sharedPrefix"),
    )

    epochs: float = Field(default=3.0, gt=0, le=1000)
    """Training epochs."""
    learning_rate: float = Field(default=1e-4, gt=0, le=1)
    """Peak learning rate."""
    per_device_batch_size: int | None = Field(default=None, ge=1, le=1024)
    """Micro-batch per GPU. Unset: sized from the accelerator's memory (see docs/training-recipe.md)."""
    gradient_accumulation_steps: int | None = Field(default=None, ge=1, le=1024)
    """Gradient accumulation steps. Unset: chosen with the micro-batch to keep the effective batch."""
    lr_scheduler: Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                          "constant_with_warmup"] = "cosine"
    """Learning-rate schedule."""
    warmup_ratio: float = Field(default=0.1, ge=0, le=1)
    """Fraction of steps spent warming up."""
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Training precision."""
    packing: bool | None = None
    """Pack short samples into cutoff-length rows (without cross-attention between samples). Unset: on."""
    shared_prefix: bool | None = None
    """Carry the prompt tokens all samples start with (template, system prompt, a fixed instruction) once per packed
    row instead of once per sample; each sample still sees only itself, at its own positions: the same loss and
    gradients from fewer tokens (docs/training-recipe.md has the measured saving). Needs packing with attention
    sdpa or eager (unset attention then means sdpa). Unset: on wherever packing uses a mask (the stock image's
    SDPA), off with FA2; data without such a prefix trains as plain packed rows."""
    compile: bool | None = None
    """Compile each decoder layer with torch.compile: a compile before the first step, then faster steps (Liger
    kernels are turned off, they do not compile). Unset: with the shared prefix where no gradient checkpointing is
    needed, for jobs long enough to win back the compile time; docs/training-recipe.md has the threshold and the
    measurements it comes from."""
    gradient_checkpointing: bool | None = None
    """Recompute activations to save memory. Unset: only when the accelerator's memory needs it."""
    attention: Literal["auto", "sdpa", "fa2", "eager"] | None = None
    """Attention kernel. Unset: chosen by the recipe."""
    logging_steps: int = Field(default=10, ge=1)
    """Log every this many optimizer steps."""
    save_steps: int = Field(default=500, ge=1)
    """Checkpoint every this many optimizer steps."""
    eval_steps: int | None = Field(default=None, ge=1)
    """Evaluate on `dataset.validation` every this many steps (default: saveSteps)."""
    resume: Literal["auto", "never"] = "auto"
    """What a rerun of the job does with the checkpoints an earlier run left (a RayJob retry after a failure or
    a lost node, a restarted driver): `auto` continues from the latest complete checkpoint, with the optimizer,
    schedule and data position it saved, so the run ends after the same optimizer steps as an uninterrupted one;
    `never` deletes them and trains from step 0."""

    @model_validator(mode="after")
    def _shared_prefix_needs_the_mask(self) -> Training:   # the CEL rule above, for specs read without the API
        if self.shared_prefix and (self.packing is False or self.attention not in (None, "sdpa", "eager")):
            raise ValueError("training.sharedPrefix needs packing with a mask: leave packing on and attention unset, "
                             "sdpa or eager")
        return self


class FineTuneSpec(JobControls):
    model_config = validations(
        cel("self.method.type == 'full' || self.method.rank <= 256", "method.rank must be at most 256",
            field_path=".method.rank"),
    )

    base_model: BaseModelSource
    """The model to fine-tune."""
    template: str = Field(max_length=64, pattern=r"^[a-z0-9_.-]+$")
    """LLaMA-Factory chat template, e.g. qwen, llama3, mistral."""
    method: Method = Field(default_factory=Method)
    """Fine-tuning method and adapter shape."""
    dataset: Dataset
    """Training (and validation) data."""
    training: Training = Field(default_factory=Training)
    """Optimisation settings; unset speed knobs are chosen by the fast recipe."""
    extra_args: dict[str, Any] | None = Field(default=None, max_length=MAX_MAP)
    """Further LLaMA-Factory keys passed through as they are. Keys the operator manages are refused (the
    resource stalls with a message naming them): use the matching spec field instead."""
    resources: Resources = Field(default_factory=Resources)
    """GPU workers: count, size and node pool."""
    output: Storage
    """Where the adapter (and all_results.json) is written."""

    @model_validator(mode="after")
    def _no_managed_extra_args(self) -> FineTuneSpec:
        clashing = sorted(set(self.extra_args or {}) & MANAGED_KEYS)
        if clashing:
            raise ValueError(f"spec.extraArgs may not set {', '.join(clashing)}: the operator manages these keys; "
                             "use the matching spec field instead")
        return self


class AdapterStatus(ApiModel):
    uri: str | None = None
    """Where the trained adapter is."""
    base_model: str | None = None
    """The base model it adapts."""
    rank: int | None = None
    """LoRA rank, as checked in adapter_config.json."""


class TrainMetrics(ApiModel):
    train_loss: float | None = None
    """Training loss at the end."""
    eval_loss: float | None = None
    """Loss on the evaluation split, if there is one."""
    train_runtime_seconds: float | None = None
    """How long training took."""
    train_samples_per_second: float | None = None
    """Training throughput."""
    simulated: bool | None = None
    """True when the local plane's data-plane simulator wrote these figures: no model ran, they measure nothing
    about this resource. Absent when the job itself reported them."""


class FineTuneStatus(JobStatus):
    adapter: AdapterStatus | None = None
    """The adapter the job wrote, once it Succeeded."""
    metrics: TrainMetrics | None = None
    """Training metrics the job reported."""

