"""What FineTune and BatchInference share: both run one RayJob and read one result report."""

from __future__ import annotations

import re
import time
from typing import Any, Callable, Mapping

from pydantic import BaseModel, ValidationError

from ..builders.common import BuildContext, UnknownAccelerator
from ..status import Verdict, job_verdict, pod_problems, result_report
from .engine import Engine, Outcome, now_rfc3339

TERMINAL = ("Succeeded", "Failed")
OWN_PATH = re.compile(r"^spec[\w.\[\]-]*: ")   # a validator's message that starts by naming its field


def spec_errors(error: ValidationError) -> str:
    """pydantic's errors as one sentence, each naming its field by its YAML path once."""
    parts = []
    for e in error.errors():
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"])
        text = str(e["ctx"]["error"]) if e["type"] == "value_error" and "error" in e.get("ctx", {}) else e["msg"]
        if not where:   # a rule across fields: its message names them
            parts.append(text if text.startswith("spec") else f"spec: {text}")
            continue
        text = OWN_PATH.sub("", text)   # the location names the field already
        parts.append(f"spec.{text}" if text.startswith(where[1:] + ".") else f"spec{where}: {text}")
    return "; ".join(parts)


def validate(model: type[BaseModel], body: Mapping[str, Any]) -> tuple[Any, Verdict | None]:
    try:
        return model.model_validate(body.get("spec") or {}), None
    except ValidationError as e:
        return None, Verdict("Failed", "stalled", "InvalidSpec", spec_errors(e))


def kept(body: Mapping[str, Any]) -> Verdict:
    """A finished run's verdict, as its status already says (a finished job is never started again)."""
    status = body.get("status") or {}
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
    phase = status.get("phase", "Failed")
    fields = {k: v for k, v in status.items() if k not in ("phase", "conditions", "observedGeneration", "message")}
    return Verdict(phase, "ready" if phase == "Succeeded" else "stalled", ready.get("reason", phase),
                   status.get("message", ""), fields)


def simulated_mark(metrics: Mapping[str, Any]) -> dict[str, bool]:
    """`{"simulated": True}` when the report's figures came from the local plane's simulator, so status says so."""
    return {"simulated": True} if metrics.get("simulated") is True else {}


def job_outcome(engine: Engine, body: Mapping[str, Any], spec: Any, kind: str,
                build: Callable[[Mapping[str, Any], BuildContext], list[dict[str, Any]]],
                ray_name: str, result_fields: Callable[[dict[str, Any]], dict[str, Any]],
                extra_fields: dict[str, Any] | None = None) -> Outcome:
    status = body.get("status") or {}
    generation = body["metadata"].get("generation", 1)
    if status.get("phase") in TERMINAL and status.get("observedGeneration") == generation:
        return Outcome([], kept(body))
    uid = body["metadata"]["uid"]
    ray = engine.ray_object(uid)
    report = result_report(engine.caches.results.get(uid))
    problems = pod_problems(engine.caches.pods.all(uid))
    verdict = job_verdict(kind, spec.suspend, ray, report, problems, time.time(),
                          started=bool(status.get("startTime")), ray_name=ray_name)

    ray_status = (ray or {}).get("status") or {}
    fields: dict[str, Any] = {"rayJobName": ray_name, **(extra_fields or {})}
    for ours, theirs in (("rayClusterName", "rayClusterName"), ("dashboardURL", "dashboardURL")):
        if ray_status.get(theirs):
            fields[ours] = ray_status[theirs]
    if status.get("startTime") or ray is not None:
        fields["startTime"] = status.get("startTime") or now_rfc3339()
    if verdict.phase in TERMINAL:
        fields["completionTime"] = status.get("completionTime") or now_rfc3339()
    if report.get("progress") and verdict.phase == "Running":
        fields["progress"] = report["progress"]
    fields.update(result_fields(report))
    verdict = Verdict(verdict.phase, verdict.state, verdict.reason, verdict.message, fields, verdict.recheck_after)
    if verdict.reason == "RayJobDeleted":
        # Never re-created: whoever deleted it stopped the run. Checked against the API server first, since
        # the decision is final and the watch may lag.
        return Outcome([], verdict, confirm_absent=("ray.io/v1", "RayJob", ray_name))

    memo_key = (generation, tuple(sorted((extra_fields or {}).items())))   # the children depend on nothing else
    children: list[dict[str, Any]] = []
    if ray is None or not engine.children_current(uid, memo_key):
        try:
            children = build(body, engine.ctx)
        except UnknownAccelerator as e:
            return Outcome([], Verdict("Failed", "stalled", "UnknownAccelerator", str(e)))
    return Outcome(children, verdict, memo_key=memo_key, requeue_after=verdict.recheck_after)
