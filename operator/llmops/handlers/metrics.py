"""Prometheus metrics (text format 0.0.4) served from the engine's counters; no extra dependency."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from .engine import Engine

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def render(engine: Engine) -> str:
    m = engine.metrics
    lines = ["# HELP llmops_reconciles_total Reconciles by kind and result.",
             "# TYPE llmops_reconciles_total counter"]
    for (kind, result), count in sorted(m.reconciles.items()):
        lines.append(f'llmops_reconciles_total{{kind="{kind}",result="{result}"}} {count}')
    lines += ["# HELP llmops_reconcile_duration_seconds Reconcile duration by kind.",
              "# TYPE llmops_reconcile_duration_seconds histogram"]
    for kind, samples in sorted(m.durations.items()):
        for bound in BUCKETS:
            lines.append(f'llmops_reconcile_duration_seconds_bucket{{kind="{kind}",le="{bound}"}} '
                         f'{sum(1 for s in samples if s <= bound)}')
        lines.append(f'llmops_reconcile_duration_seconds_bucket{{kind="{kind}",le="+Inf"}} {len(samples)}')
        lines.append(f'llmops_reconcile_duration_seconds_sum{{kind="{kind}"}} {sum(samples):.6f}')
        lines.append(f'llmops_reconcile_duration_seconds_count{{kind="{kind}"}} {len(samples)}')
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
    # Durations are kept as samples; cap them so a long-running operator stays small.
    async def handle(_: web.Request) -> web.Response:
        for kind, samples in engine.metrics.durations.items():
            if len(samples) > 10000:
                del samples[:-10000]
        return web.Response(text=render(engine), content_type="text/plain", charset="utf-8")

    app = web.Application()
    app.router.add_get("/metrics", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    return runner
