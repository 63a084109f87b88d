"""What a resource reads of the resources it names: whether each is Ready, failed or stuck, and why, and the
adapter a FineTune produced. One judgement for every reader (a BatchInference's model, an LLMService's adapters
and gates), so they never disagree about the same FineTune."""

from __future__ import annotations

from dataclasses import dataclass

from .api.common import Condition, StatusBase
from .api.finetune import FineTuneStatus

READY, WAITING, FAILED = "Ready", "Waiting", "Failed"


def condition(status: StatusBase, type_: str) -> Condition | None:
    return next((c for c in status.conditions or [] if c.type == type_), None)


def is_ready(status: StatusBase) -> bool:
    ready = condition(status, "Ready")
    if ready is not None:
        return ready.status == "True"
    return status.phase in ("Ready", "Succeeded")


def is_failed(status: StatusBase) -> bool:
    # Not Stalled alone: a job whose pods cannot be scheduled is Stalled yet still Pending.
    return status.phase == "Failed"


def is_stalled(status: StatusBase) -> bool:
    stalled = condition(status, "Stalled")
    return stalled is not None and stalled.status == "True"


def why(status: StatusBase) -> str:
    for type_ in ("Stalled", "Ready"):
        cond = condition(status, type_)
        if cond and cond.message:
            return cond.message
    return status.message or ""


def with_why(text: str, status: StatusBase) -> str:
    reason = why(status)
    return f"{text}: {reason}" if reason else text


def not_ready(kind: str, name: str, status: StatusBase) -> str:
    text = f"{kind} {name} is {status.phase or 'Pending'}"
    return with_why(f"{text} and stuck", status) if is_stalled(status) else text


@dataclass(frozen=True)
class FineTuneOutput:
    """Where a FineTune's adapter stands for the resources that use it."""

    state: str                 # READY (uri set), WAITING or FAILED
    message: str = ""          # why it is not READY
    uri: str | None = None
    rank: int | None = None


def finetune_output(name: str, status: FineTuneStatus) -> FineTuneOutput:
    if is_failed(status):
        return FineTuneOutput(FAILED, with_why(f"FineTune {name} failed", status))
    if not is_ready(status):
        return FineTuneOutput(WAITING, not_ready("FineTune", name, status))
    if status.adapter is None or not status.adapter.uri:
        return FineTuneOutput(FAILED, f"FineTune {name} is Ready but reports no status.adapter.uri")
    return FineTuneOutput(READY, uri=status.adapter.uri, rank=status.adapter.rank)
