"""Pieces every kind's children share: names, labels, ownership, the result channel, the payload sources.

All functions are pure: (custom resource, settings, inputs) -> plain dicts.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass, field
from importlib import metadata, resources
from pathlib import Path
from typing import Any, Mapping

from ..api.common import Resources, WorkloadControls
from ..settings import AcceleratorProfile, Settings

JOB_MOUNT = "/etc/llmops/job"
PAYLOAD_ROOT = "/opt/llmops"
PVC_ROOT = "/mnt/llmops/pvc"
RAY_NAME_MAX = 40  # KubeRay derives longer names (cluster, head service) from the RayJob/RayService name
# Labels on every child. Fixed, not a setting: the operator's watches and indexes select by them (handlers/main.py).
LABEL_PREFIX = "llmops.dev"
ROLE_LABEL = f"{LABEL_PREFIX}/role"            # RESULT_ROLE, "config", PAYLOADS_ROLE
RESULT_ROLE = "result"       # the ConfigMap a job's payload reports into
CACHE_ROLE = "cache-report"  # the ConfigMap a model download reports into
DOWNLOAD_ROLE = "model-download"   # the pod of a model download Job (not a Ray pod)
PAYLOADS_ROLE = "payloads"   # the namespace's shared ConfigMap of payload sources
OWNER_KIND_LABEL = f"{LABEL_PREFIX}/owner-kind"
OWNER_UID_LABEL = f"{LABEL_PREFIX}/owner-uid"
MANAGED_BY = {"app.kubernetes.io/managed-by": "llmops"}   # on every child; the watches select by it
MANAGED_SELECTOR = ",".join(f"{k}={v}" for k, v in MANAGED_BY.items())   # ... as a label selector
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"   # a RayJob's Kueue LocalQueue: Kueue manages the jobs that carry it
WORKLOAD_API = "kueue.x-k8s.io/v1beta2"      # Kueue's Workload: one per queued job, it holds why the job waits
WORKLOAD_JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"   # on a Workload: the uid of the job it was made for


@dataclass(frozen=True)
class Owner:
    """The custom resource a set of children belongs to."""

    api_version: str
    kind: str
    name: str
    namespace: str
    uid: str
    generation: int = 1

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> Owner:
        meta = body["metadata"]
        return cls(body["apiVersion"], body["kind"], meta["name"], meta["namespace"], meta.get("uid", ""),
                   meta.get("generation", 1))


@dataclass(frozen=True)
class BuildContext:
    """Everything a builder may read besides the resource itself."""

    settings: Settings
    payloads: Mapping[str, str] = field(default_factory=dict)
    """Payload module file name -> source, shipped to the Ray pods."""

    @functools.cached_property
    def fingerprint(self) -> str:
        """Everything here and the code that builds: equal fingerprints build equal children from equal inputs."""
        return short_hash([self.settings.model_dump(mode="json"), sorted(self.payloads.items()), _code()], 16)


def built_from(ctx: BuildContext, owner: Owner, *inputs: Any) -> str:
    """What a set of children is a function of: the owner's generation (its spec), the other inputs the decision
    passes to the builder, and the build context. Written on the marker, so a restarted operator that finds the
    same value there knows the set as it would build it is already applied."""
    return short_hash([ctx.fingerprint, owner.generation, inputs], 16)


@functools.cache
def _code() -> list[str]:
    """The operator's source and the versions of the libraries its output depends on."""
    root = Path(__file__).resolve().parents[1]
    sources = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        sources.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return [sources.hexdigest(), *(_version(d) for d in ("pydantic", "PyYAML"))]


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return ""


def short_hash(data: Any, length: int = 10) -> str:
    text = data if isinstance(data, str) else json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def child_name(owner: Owner, suffix: str, limit: int = 63) -> str:
    """`<owner>-<suffix>`, shortened with a hash when too long, stable for the same owner."""
    name = f"{owner.name}-{suffix}"
    return name if len(name) <= limit else _hashed_name(owner.name, owner.name, suffix, limit)


def _hashed_name(stem: str, identity: str, suffix: str, limit: int) -> str:
    """`<stem, cut to fit>-<hash of identity>-<suffix>`: within `limit`, and distinct for distinct identities."""
    keep = limit - len(suffix) - 8
    return f"{stem[:keep].rstrip('-')}-{short_hash(identity, 6)}-{suffix}"


DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def ray_name(owner: Owner, tag: str) -> str:
    """The RayJob / RayService name. KubeRay refuses any but a DNS-1035 label (lowercase letters, digits and '-',
    a letter first), while our resources may be named like any object (`viggo.v2`, `0`): such a name is spelled
    with '-' for the rest, an `r-` in front of a digit, and a hash of the real name so that `a.b` and `a-b` differ."""
    name = child_name(owner, tag, RAY_NAME_MAX)
    if DNS1035_LABEL.fullmatch(name):
        return name
    stem = re.sub(r"[^a-z0-9-]+", "-", owner.name).strip("-")
    stem = f"r-{stem}" if not stem[:1].isalpha() else stem
    return _hashed_name(stem, owner.name, tag, RAY_NAME_MAX)


@dataclass(frozen=True)
class Names:
    ray: str          # RayJob / RayService
    config: str       # ConfigMap with the job files and the payload sources
    result: str       # ConfigMap the payload reports into
    account: str      # ServiceAccount, Role and RoleBinding of the Ray pods

    @classmethod
    def of(cls, owner: Owner, tag: str) -> Names:
        return cls(ray=ray_name(owner, tag), config=child_name(owner, f"{tag}-config"),
                   result=child_name(owner, f"{tag}-result"), account=child_name(owner, f"{tag}-ray"))


def labels(owner: Owner) -> dict[str, str]:
    return {**MANAGED_BY, OWNER_KIND_LABEL: owner.kind, OWNER_UID_LABEL: owner.uid}


def owned(obj: dict[str, Any], owner: Owner, settings: Settings, extra_labels: Mapping[str, str] | None = None
          ) -> dict[str, Any]:
    """Namespace, labels and a controller owner reference (so the garbage collector cleans up)."""
    meta = obj.setdefault("metadata", {})
    meta["namespace"] = owner.namespace
    meta["labels"] = {**labels(owner), **(extra_labels or {}), **meta.get("labels", {})}
    meta["ownerReferences"] = [{"apiVersion": owner.api_version, "kind": owner.kind, "name": owner.name,
                                "uid": owner.uid, "controller": True, "blockOwnerDeletion": True}]
    return obj


# ---- the result channel -----------------------------------------------------------------------------------
def ray_account(names: Names, spec: WorkloadControls) -> str:
    """The ServiceAccount the Ray pods run as: the spec's own, else the one the operator creates."""
    return spec.service_account_name or names.account


def result_channel(owner: Owner, names: Names, settings: Settings, spec: WorkloadControls,
                   role: str = RESULT_ROLE) -> list[dict[str, Any]]:
    """Result ConfigMap and a Role that may get/patch only that ConfigMap, bound to the pods' ServiceAccount:
    one the operator creates, or the spec's own (which gains nothing else)."""
    account = ray_account(names, spec)
    created = []
    if spec.service_account_name is None:
        meta: dict[str, Any] = {"name": names.account}
        if settings.ray_service_account_annotations:
            meta["annotations"] = dict(settings.ray_service_account_annotations)
        created.append(owned({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta,
                              "automountServiceAccountToken": True}, owner, settings))
    return [
        owned({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": names.result}, "data": {}},
              owner, settings, {ROLE_LABEL: role}),
        *created,
        owned({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": names.account},
               "rules": [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [names.result],
                          "verbs": ["get", "patch"]}]}, owner, settings),
        owned({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": names.account},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": names.account},
               "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": owner.namespace}]},
              owner, settings),
    ]


def config_map(owner: Owner, names: Names, settings: Settings, files: Mapping[str, str]) -> dict[str, Any]:
    return owned({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": names.config}, "data": dict(files)},
                 owner, settings, {ROLE_LABEL: "config"})


# ---- the payload sources, shared ----------------------------------------------------------------------------


def payloads_name(payloads: Mapping[str, str]) -> str:
    """Named by content: an operator upgrade that changes a payload makes a new one, and running jobs keep theirs."""
    return _payloads_name(tuple(sorted(payloads.items())))


@functools.lru_cache(maxsize=8)
def _payloads_name(items: tuple[tuple[str, str], ...]) -> str:
    return f"llmops-payloads-{short_hash(dict(items))}"   # the data exactly as written (keys are file names)


def load_payloads() -> dict[str, str]:
    """The payload modules shipped to Ray pods, read from the installed `payloads` package."""
    package = resources.files("payloads")
    return {f.name: f.read_text() for f in sorted(package.iterdir(), key=lambda f: f.name)
            if f.name.endswith(".py")}


def payload_config_map(namespace: str, payloads: Mapping[str, str], settings: Settings) -> dict[str, Any]:
    """Every payload module in one immutable ConfigMap per namespace, shared by all jobs there (each job used to
    carry its own ~80 KB copy). It has no owner: it is written once and stays until the namespace goes."""
    return {"apiVersion": "v1", "kind": "ConfigMap", "immutable": True,
            "metadata": {"name": payloads_name(payloads), "namespace": namespace,
                         "labels": {**MANAGED_BY, ROLE_LABEL: PAYLOADS_ROLE}},
            "data": dict(sorted(payloads.items()))}   # keyed by file name: mounted whole as the package


def is_shared(child: Mapping[str, Any]) -> bool:
    return (child["metadata"].get("labels") or {}).get(ROLE_LABEL) == PAYLOADS_ROLE


# ---- accelerators ---------------------------------------------------------------------------------------------
def profile_for(resources: Resources, settings: Settings) -> AcceleratorProfile:
    profiles = settings.profiles()
    profile = profiles.get(resources.accelerator)
    if profile is None:
        known = ", ".join(sorted(profiles))
        raise UnknownAccelerator(f"spec.resources.accelerator {resources.accelerator!r} is not a profile of this "
                                 f"operator (cloud {settings.cloud}); use one of {known} or add it to the operator "
                                 "settings (accelerators)")
    return profile


class UnknownAccelerator(ValueError):
    pass
