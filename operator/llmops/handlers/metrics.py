"""Prometheus metrics (text format 0.0.4) served from the engine's counters; no extra dependency."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from .engine import Engine

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


@dataclass
class Histogram:
    """Cumulative-bucket histogram in constant memory."""

    counts: list[int] = field(default_factory=lambda: [0] * len(DURATION_BUCKETS))
    total: float = 0.0
    n: int = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(DURATION_BUCKETS):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.n += 1


@dataclass
class Metrics:
    reconciles: dict[tuple[str, str], int] = field(default_factory=dict)   # (kind, result) -> count
    durations: dict[str, Histogram] = field(default_factory=dict)          # kind -> seconds
    api_errors: dict[str, int] = field(default_factory=dict)               # reason -> count
    child_writes: int = 0
    status_writes: int = 0

    def count(self, kind: str, result: str, seconds: float) -> None:
        self.reconciles[(kind, result)] = self.reconciles.get((kind, result), 0) + 1
        self.durations.setdefault(kind, Histogram()).observe(seconds)


def render(engine: Engine) -> str:
    m = engine.metrics
    lines = ["# HELP llmops_reconciles_total Reconciles by kind and result.",
             "# TYPE llmops_reconciles_total counter"]
    for (kind, result), count in sorted(m.reconciles.items()):
        lines.append(f'llmops_reconciles_total{{kind="{kind}",result="{result}"}} {count}')
    lines += ["# HELP llmops_reconcile_duration_seconds Reconcile duration by kind.",
              "# TYPE llmops_reconcile_duration_seconds histogram"]
    for kind, hist in sorted(m.durations.items()):
        for bound, count in zip(DURATION_BUCKETS, hist.counts):
            lines.append(f'llmops_reconcile_duration_seconds_bucket{{kind="{kind}",le="{bound}"}} {count}')
        lines.append(f'llmops_reconcile_duration_seconds_bucket{{kind="{kind}",le="+Inf"}} {hist.n}')
        lines.append(f'llmops_reconcile_duration_seconds_sum{{kind="{kind}"}} {hist.total:.6f}')
        lines.append(f'llmops_reconcile_duration_seconds_count{{kind="{kind}"}} {hist.n}')
    lines += ["# HELP llmops_resources Resources by kind and phase.", "# TYPE llmops_resources gauge"]
    phases: dict[tuple[str, str], int] = {}
    for (kind, _, _), body in engine.caches.owners.items():
        phase = (body.get("status") or {}).get("phase") or "Pending"
        phases[(kind, phase)] = phases.get((kind, phase), 0) + 1
    for (kind, phase), count in sorted(phases.items()):
        lines.append(f'llmops_resources{{kind="{kind}",phase="{phase}"}} {count}')
    lines += ["# HELP llmops_api_errors_total API errors by reason.", "# TYPE llmops_api_errors_total counter"]
    for reason, count in sorted(m.api_errors.items()):
        lines.append(f'llmops_api_errors_total{{reason="{reason}"}} {count}')
    lines += ["# HELP llmops_api_requests_total Operator write requests by verb.",
              "# TYPE llmops_api_requests_total counter"]
    for verb, count in sorted(engine.kube.requests_by_verb.items()):
        lines.append(f'llmops_api_requests_total{{verb="{verb}"}} {count}')
    return "\n".join(lines) + "\n"


async def serve_metrics(engine: Engine, port: int) -> web.AppRunner:
    async def handle(_: web.Request) -> web.Response:
        return web.Response(text=render(engine), content_type="text/plain", charset="utf-8")

    app = web.Application()
    app.router.add_get("/metrics", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    return runner
