"""The kind registry: from a kind's name to all of it in one hop. Its API (spec and status models, CRD names
and columns), how its reconcile observes (handlers/observe.py) and decides (llmops.decide), and what its
children are built by. The engine applies what decide returns, whatever the kind."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from ..api import BATCHINFERENCE, FINETUNE, LLMSERVICE, Kind
from ..builders import batchinference as batchinference_builder
from ..builders import finetune as finetune_builder
from ..builders import llmservice as llmservice_builder
from ..builders.common import BuildContext
from ..decide import batchinference, finetune, llmservice
from ..decide.common import Outcome
from . import observe

if TYPE_CHECKING:
    from .engine import Engine


@dataclass(frozen=True)
class Reconciler:
    api: Kind
    observe: Callable[[Engine, dict[str, Any]], Any]            # the caches -> a typed observation
    decide: Callable[[Any, BuildContext], Outcome]              # pure: observation -> children, verdict, requeue
    build: Callable[..., list[dict[str, Any]]]                  # (owner, spec, ctx, ...) -> the children
    # What to look up before observing that the watches cannot tell (which optional APIs are served).
    prepare: Callable[[Engine, dict[str, Any]], Awaitable[None]] | None = None


RECONCILERS: dict[str, Reconciler] = {r.api.kind: r for r in (
    Reconciler(FINETUNE, observe.finetune, finetune.decide, finetune_builder.build),
    Reconciler(BATCHINFERENCE, observe.batchinference, batchinference.decide, batchinference_builder.build),
    Reconciler(LLMSERVICE, observe.llmservice, llmservice.decide, llmservice_builder.build,
               prepare=observe.prepare_llmservice),
)}
