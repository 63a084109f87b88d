"""Building blocks shared by the three kinds: base model config, secrets, resources, status.

Every model here is the single source of truth for its part of the API: the CRD's OpenAPI schema, its
descriptions (``kubectl explain``), its defaults and the operator's own validation all come from it.
Cross-field rules carry both a pydantic validator (the operator's check) and a CEL rule (the API server's
check) through :func:`cel`, so the two sit side by side and are tested from one table.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

GROUP = "llmops.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

OBJECT_STORE_SCHEMES = ("s3://", "gs://")
STORAGE_URI_PATTERN = r"^(s3://|gs://|pvc://)[^\s]+$"
STORAGE_URI_HELP = "must start with s3://, gs:// or pvc://<claim>/<path>"
MODEL_SOURCE_PATTERN = r"^((s3://|gs://|pvc://)[^\s]+|[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9._-]+)$"
K8S_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?$"

# Bounds keep the CEL cost estimator happy and stop runaway specs; they are generous for real use.
MAX_LIST = 64
MAX_MAP = 64
MAX_STRING = 2048
MAX_TEXT = 32768


def cel(rule: str, message: str, field_path: str | None = None, reason: str | None = None) -> dict[str, str]:
    """One `x-kubernetes-validations` entry."""
    entry = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    if reason:
        entry["reason"] = reason
    return entry


class ApiModel(BaseModel):
    """Base for every API object: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid",
                              use_attribute_docstrings=True)

    def wire(self) -> dict[str, Any]:
        """The object as it appears in YAML: camelCase, unset optional fields left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def validations(*rules: dict[str, str]) -> ConfigDict:
    """Model config carrying CEL rules into the generated schema."""
    return ConfigDict(json_schema_extra={"x-kubernetes-validations": list(rules)})


class LocalRef(ApiModel):
    name: str = Field(pattern=K8S_NAME_PATTERN, max_length=253)
    """Name of the resource in the same namespace."""


class SecretKeyRef(ApiModel):
    name: str = Field(pattern=K8S_NAME_PATTERN, max_length=253)
    """Name of the Secret in the resource's namespace."""
    key: str = Field(max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")
    """Key inside the Secret."""


class SecretRef(ApiModel):
    name: str = Field(pattern=K8S_NAME_PATTERN, max_length=253)
    """Name of a Secret whose keys become environment variables of the Ray pods (e.g. AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS)."""


class Secrets(ApiModel):
    """Credentials, always as references to Secrets: values never appear in specs, children or status."""

    hugging_face_token: SecretKeyRef | None = None
    """Secret key holding a Hugging Face token; exposed to the Ray pods as HF_TOKEN."""
    storage: SecretRef | None = None
    """Secret with object-storage credentials, exposed to the Ray pods as environment variables."""


class RuntimeEnv(ApiModel):
    pip: list[str] | None = Field(default=None, max_length=MAX_LIST)
    """Extra pip requirements installed by Ray's runtime environment (e.g. `llamafactory==0.9.4`)."""
    env_vars: dict[str, str] | None = Field(default=None, max_length=MAX_MAP)
    """Environment variables for the Ray job. Secret values belong in `secrets`, not here."""


class Toleration(ApiModel):
    key: str | None = Field(default=None, max_length=317)
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = Field(default=None, max_length=MAX_STRING)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class Resources(ApiModel):
    """Where and how big the Ray GPU workers are."""

    workers: int = Field(default=1, ge=1, le=512)
    """Number of Ray GPU worker pods."""
    gpus_per_worker: int = Field(default=1, ge=1, le=16)
    """GPUs per worker pod."""
    accelerator: str = Field(default="L4", max_length=63, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Accelerator profile (e.g. L4, A10G, L40S, A100, H100): the operator settings map it to node selectors,
    tolerations, Ray's accelerator_type and GPU memory."""
    cpus_per_worker: int = Field(default=8, ge=1, le=512)
    """CPU cores requested per worker pod."""
    memory_per_worker: str = Field(default="32Gi", pattern=QUANTITY_PATTERN, max_length=32)
    """Memory requested per worker pod (a Kubernetes quantity, e.g. 32Gi)."""
    node_selector: dict[str, str] | None = Field(default=None, max_length=MAX_MAP)
    """Extra node selector labels for the worker pods, merged over the accelerator profile's."""
    tolerations: list[Toleration] | None = Field(default=None, max_length=MAX_LIST)
    """Extra tolerations for the worker pods, added to the accelerator profile's."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement strategy for the training workers."""


class Storage(ApiModel):
    uri: str = Field(pattern=STORAGE_URI_PATTERN, max_length=MAX_STRING)
    """Location: s3://bucket/prefix, gs://bucket/prefix or pvc://<claim>/<path>."""


class ModelCache(ApiModel):
    """Download the model once into a PersistentVolumeClaim that every Ray pod mounts read-only, instead of
    every worker and replica downloading it (docs/model-cache.md)."""

    size: str = Field(pattern=QUANTITY_PATTERN, max_length=32)
    """Size of the claim: the model's files and a margin (a 7B model in bf16 takes about 15Gi; ask 20Gi)."""
    storage_class_name: str | None = Field(default=None, pattern=K8S_NAME_PATTERN, max_length=253)
    """StorageClass of the claim. Unset: the cluster's default class."""
    access_mode: Literal["ReadWriteMany", "ReadOnlyMany"] = "ReadWriteMany"
    """ReadWriteMany: a shared file system (EFS, Filestore, CephFS). ReadOnlyMany: a disk that attaches read-only
    to many nodes once written (e.g. a GCE persistent disk); the claim then also asks ReadWriteOnce, for the one
    download pod that writes it before any reader starts."""


PVC_CACHE_RULE = "!has(self.cache) || !has(self.source) || !self.source.startsWith('pvc://')"


def no_cache_for_pvc(source: str | None, cache: ModelCache | None, where: str) -> None:
    """A pvc:// model is read in place: a cache of it would only copy one claim into another."""
    if cache is not None and source is not None and source.startswith("pvc://"):
        raise ValueError(f"{where}.cache: a pvc:// source is read in place from its claim; unset {where}.cache")


class WorkloadControls(ApiModel):
    """What every Ray workload takes: image, runtime environment, credentials, suspension."""

    image: str | None = Field(default=None, max_length=MAX_STRING)
    """Ray image for head and workers; the operator settings hold the default."""
    runtime_env: RuntimeEnv | None = None
    """Ray runtime environment additions."""
    secrets: Secrets | None = None
    """Credentials as Secret references."""
    service_account_name: str | None = Field(default=None, pattern=K8S_NAME_PATTERN, max_length=253)
    """ServiceAccount (in this namespace) the Ray pods run as, e.g. one annotated for EKS IRSA
    (eks.amazonaws.com/role-arn) or GKE Workload Identity, so the pods reach object storage without keys. The
    operator binds it to this resource's result ConfigMap only (get and patch) and creates no account of its own.
    Unset: the operator creates one per resource (annotated with the settings' ray_service_account_annotations)."""
    suspend: bool = False
    """Suspend: no Ray cluster exists while true; resuming starts it again."""


class JobControls(WorkloadControls):
    """Knobs passed through to the RayJob."""

    backoff_limit: int = Field(default=0, ge=0, le=10)
    """Retries of a failed Ray job before the resource fails."""
    active_deadline_seconds: int | None = Field(default=None, ge=1)
    """Fail the job if it runs longer than this."""
    ttl_seconds_after_finished: int | None = Field(default=None, ge=0)
    """Delete the finished RayJob (not this resource) after this many seconds."""
    queue_name: str | None = Field(default=None, pattern=K8S_NAME_PATTERN, max_length=63)
    """Kueue LocalQueue (in this namespace) the job waits in: the RayJob gets the kueue.x-k8s.io/queue-name label
    and Kueue decides when it runs (it suspends the RayJob until the queue admits it; status says Queued with
    Kueue's reason meanwhile). The operator then never writes the RayJob's spec.suspend, so spec.suspend cannot
    be set as well. Needs Kueue with its ray.io/rayjob integration."""
    priority_class_name: str | None = Field(default=None, pattern=K8S_NAME_PATTERN, max_length=253)
    """PriorityClass of the Ray pods (it must exist). With a queue, Kueue also orders and preempts the queue's
    jobs by it, unless the RayJob names a WorkloadPriorityClass."""

    @model_validator(mode="after")
    def _queue_owns_suspend(self) -> JobControls:
        if self.queue_name and self.suspend:
            raise ValueError("spec.suspend cannot be true together with spec.queueName: Kueue suspends and resumes "
                             "a queued job; unset spec.queueName to suspend it yourself, or stop the queue "
                             "(ClusterQueue spec.stopPolicy)")
        return self


class Condition(ApiModel):
    """A kstatus condition (metav1.Condition). Ready, Reconciling and Stalled are always written, except that a
    suspended resource has Suspended=True in place of Ready; all of them carry the same reason and message."""

    type: str
    """Ready (the job succeeded, or the service serves), Reconciling (the operator or the work is still making
    progress), Stalled (it cannot progress until something changes; the message says what), or Suspended."""
    status: Literal["True", "False", "Unknown"]
    """True, False or Unknown."""
    reason: str
    """Why, in one CamelCase word (e.g. JobRunning, Unschedulable, PayloadFailed)."""
    message: str = ""
    """What is happening and, when stuck, what to do about it."""
    observed_generation: int | None = None
    """The metadata.generation this condition describes; older than the resource's generation means stale."""
    last_transition_time: str | None = None
    """When status last changed between True and False (RFC 3339)."""


class RetryBudget(ApiModel):
    # No field defaults: a default would make the API server fill status.retries in before the operator writes.
    used: int
    """Attempts of the Ray job that failed so far (KubeRay's RayJob status.failed); each one used a retry."""
    limit: int
    """Retries allowed: spec.backoffLimit."""


class ModelCacheStatus(ApiModel):
    state: Literal["Downloading", "Cached", "Failed"]
    """Downloading (the download Job runs), Cached (the Ray pods load the model from the claim) or Failed."""
    claim_name: str
    """The PersistentVolumeClaim that holds the model."""
    source: str
    """The model it holds (spec's source)."""
    job_name: str
    """The Job that downloads it."""
    bytes_done: int | None = None
    """Bytes downloaded so far (all of them once Cached)."""
    bytes_total: int | None = None
    """Bytes the model's files take, once the download has listed them."""
    files: int | None = None
    """Files the model has."""


class StatusBase(ApiModel):
    phase: str | None = None
    """One-word summary: Pending, Waiting, Running, Succeeded, Ready, Failed, Suspended."""
    conditions: list[Condition] | None = None
    """Ready (or Suspended), Reconciling and Stalled, as metav1.Condition (kstatus)."""
    observed_generation: int | None = None
    """The spec generation the status describes; 0 until the operator has seen the resource."""
    message: str | None = None
    """What is happening and, when stuck, what to do."""
    progress: dict[str, Any] | None = None
    """Latest progress the job reported (epoch and loss, rows done, ...)."""
    model_cache: ModelCacheStatus | None = None
    """Where the model's download into its cache claim stands, with spec's model cache set."""

    @classmethod
    def read(cls, raw: Mapping[str, Any] | None) -> Self:
        """The status as the API server holds it, typed. A field this version does not know (a newer operator
        wrote it) is ignored, and one whose value it cannot read is dropped: the reconcile works from the rest and
        writes the status anew, rather than failing on it every time."""
        data = dict(raw or {})
        while True:
            try:
                return cls.model_validate(data, extra="ignore")
            except ValidationError as e:
                bad = {error["loc"][0] for error in e.errors() if error["loc"]} & data.keys()
                if not bad:
                    raise
                data = {k: v for k, v in data.items() if k not in bad}


class JobStatus(StatusBase):
    """What a FineTune and a BatchInference say of the RayJob that runs them."""

    ray_job_name: str | None = None
    """The RayJob that runs it."""
    retries: RetryBudget | None = None
    """How many of its retries (spec.backoffLimit) the Ray job has used: a failed or preempted attempt uses one."""
    ray_cluster_name: str | None = None
    """The Ray cluster KubeRay made for the RayJob."""
    dashboard_url: str | None = Field(default=None, alias="dashboardURL")
    """The Ray dashboard of that cluster, while it runs."""
    start_time: str | None = None
    """When the RayJob was created (RFC 3339); from then on the spec is immutable, except suspend."""
    completion_time: str | None = None
    """When it Succeeded or Failed (RFC 3339)."""


def exactly_one(fields: list[str], where: str) -> dict[str, str]:
    terms = " + ".join(f"(has(self.{f}) ? 1 : 0)" for f in fields)
    names = ", ".join(f"{where}.{f}" for f in fields)
    return cel(f"{terms} == 1", f"set exactly one of {names}")

