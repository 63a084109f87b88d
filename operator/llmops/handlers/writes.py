"""What the engine writes about a resource, built from its verdict: the status (typed, with its conditions) and
the Event of a phase change."""

from __future__ import annotations

import time
from typing import Any

from ..api import GROUP, KINDS
from ..builders.common import short_hash
from ..decide.common import Outcome
from ..kube import ApiError
from ..status import Verdict, conditions_for, rfc3339
from .ordering import identity


def without_none(value: Any) -> Any:
    """A copy without null values: the API server rejects null where the schema says string."""
    if isinstance(value, dict):
        return {k: without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_none(v) for v in value if v is not None]
    return value


def typed_status(kind: str, status: dict[str, Any]) -> dict[str, Any]:
    """The status through its kind's model: a field the model lacks raises here (the API server would drop it
    without a word), and values come out as the schema types them."""
    model = KINDS[kind].status_model
    return model.model_validate(status).model_dump(by_alias=True, exclude_unset=True, mode="json")


def now_rfc3339() -> str:
    return rfc3339(time.time())


def status_for(body: dict[str, Any], verdict: Verdict) -> dict[str, Any]:
    """The status a verdict makes for `body`, its conditions carried over from the current status."""
    generation = body["metadata"].get("generation", 1)
    fields = verdict.fields.wire() if verdict.fields is not None else {}
    status: dict[str, Any] = without_none({"phase": verdict.phase, "observedGeneration": generation,
                                           "message": verdict.message, **fields})
    status["conditions"] = conditions_for(verdict, generation, (body.get("status") or {}).get("conditions"),
                                          now_rfc3339())
    return typed_status(body["kind"], status)


def event_for(body: dict[str, Any], verdict: Verdict) -> dict[str, Any]:
    """The Event of a phase change (a Warning when the resource is stalled)."""
    meta = body["metadata"]
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {"apiVersion": body["apiVersion"], "kind": body["kind"], "name": meta["name"],
                           "namespace": meta["namespace"], "uid": meta.get("uid")},
        "reason": verdict.reason, "message": f"{verdict.phase}: {verdict.message}"[:1024],
        "type": "Warning" if verdict.state == "stalled" else "Normal",
        "source": {"component": "llmops-operator"},
        "firstTimestamp": now_rfc3339(), "lastTimestamp": now_rfc3339(), "count": 1,
    }


AGAIN = "The operator tries again every few minutes, and at once on any change to this resource"


def blocked_by(e: ApiError) -> Verdict | None:
    """The verdict on a refusal that a change outside the resource ends (a CRD upgraded, a quota freed or raised),
    or None for other errors."""
    if e.outdated_schema is not None:
        return outdated_crd(*e.outdated_schema)
    if e.missing is not None and e.missing[0].startswith("ray.io/"):   # optional APIs: handlers/discovery.py
        return Verdict("Pending", "stalled", "CRDMissing",
                       f"the API server does not serve {' '.join(e.missing)}: install KubeRay (the version "
                       f"docs/compatibility.md lists; docs/clusters.md). {AGAIN}")
    if e.quota_exceeded:
        return Verdict("Pending", "stalled", "QuotaExceeded",
                       f"a ResourceQuota of the namespace refuses a child object ({e.message}): free or raise the "
                       f"quota. {AGAIN}")
    if e.not_permitted:
        return Verdict("Pending", "stalled", "Forbidden",
                       f"the operator's roles do not let it write a child object ({e.message}): grant its "
                       f"ServiceAccount that permission (the chart's roles: docs/install.md). {AGAIN}")
    return None


def retrying_after(e: ApiError) -> Verdict:
    """Errors that may pass (a webhook that fails, an overloaded API server) and keep coming, before the job starts."""
    return Verdict("Pending", "progressing", "RetryingAfterErrors",
                   f"the API server keeps failing the operator's writes ({e}): trying again with back-off, every "
                   f"few minutes at most")


def outdated_crd(api_version: str, kind: str, lacking: str) -> Verdict:
    """Stalled on a CRD older than the operator: a field it writes is not in the installed schema."""
    group = api_version.split("/")[0] if "/" in api_version else ""
    fix = ("apply the CRDs of this operator's version (a Helm upgrade leaves CRDs as they were: docs/install.md)"
           if group == GROUP else
           f"upgrade {'KubeRay' if group == 'ray.io' else 'it'} to the version docs/compatibility.md lists")
    return Verdict("Pending", "stalled", "CRDOutdated",
                   f"the installed CRD of {api_version} {kind} lacks a field the operator writes ({lacking}): "
                   f"{fix}. {AGAIN}")


def attempt_of(outcome: Outcome, body: dict[str, Any]) -> str:
    """What a reconcile tried to write: a refused attempt is not repeated until something in it changes."""
    verdict = outcome.verdict
    said = {**vars(verdict), "fields": verdict.fields.wire() if verdict.fields is not None else None}
    return short_hash([identity(outcome.children), said, body["metadata"].get("generation", 1)], 16)
