"""What a resource reads of the resources it names: whether each is Ready, failed or stuck, and why, and the
adapter a FineTune produced. One judgement for every reader (a BatchInference's model, an LLMService's adapters
and gates), so they never disagree about the same FineTune."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

READY, WAITING, FAILED = "Ready", "Waiting", "Failed"


def condition(status: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c.get("type") == type_), None)


def is_ready(status: Mapping[str, Any]) -> bool:
    ready = condition(status, "Ready")
    if ready is not None:
        return ready.get("status") == "True"
    return status.get("phase") in ("Ready", "Succeeded")


def is_failed(status: Mapping[str, Any]) -> bool:
    # Not Stalled alone: a job whose pods cannot be scheduled is Stalled yet still Pending.
    return status.get("phase") == "Failed"


def is_stalled(status: Mapping[str, Any]) -> bool:
    stalled = condition(status, "Stalled")
    return stalled is not None and stalled.get("status") == "True"


def why(status: Mapping[str, Any]) -> str:
    for type_ in ("Stalled", "Ready"):
        cond = condition(status, type_)
        if cond and cond.get("message"):
            return cond["message"]
    return status.get("message") or ""


def with_why(text: str, status: Mapping[str, Any]) -> str:
    reason = why(status)
    return f"{text}: {reason}" if reason else text


def not_ready(kind: str, name: str, status: Mapping[str, Any]) -> str:
    text = f"{kind} {name} is {status.get('phase') or 'Pending'}"
    return with_why(f"{text} and stuck", status) if is_stalled(status) else text


@dataclass(frozen=True)
class FineTuneOutput:
    """Where a FineTune's adapter stands for the resources that use it."""

    state: str                 # READY (uri set), WAITING or FAILED
    message: str = ""          # why it is not READY
    uri: str | None = None
    rank: int | None = None


def finetune_output(name: str, status: Mapping[str, Any]) -> FineTuneOutput:
    if is_failed(status):
        return FineTuneOutput(FAILED, with_why(f"FineTune {name} failed", status))
    if not is_ready(status):
        return FineTuneOutput(WAITING, not_ready("FineTune", name, status))
    produced = status.get("adapter") or {}
    if not produced.get("uri"):
        return FineTuneOutput(FAILED, f"FineTune {name} is Ready but reports no status.adapter.uri")
    rank = produced.get("rank")
    return FineTuneOutput(READY, uri=produced["uri"], rank=rank if isinstance(rank, int) else None)
