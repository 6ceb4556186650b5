"""GET /metrics: Prometheus text, read from the task store at scrape time (see server/metrics.py).

Not authenticated (as /healthz): it shows counts and timings, never task contents; restrict it at the
proxy if that matters.
"""

from __future__ import annotations

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from server.metrics import StoreCollector
from server.ratelimit import RateLimitCollector
from server.routes.common import services_of

router = APIRouter()


def registry_of(request: Request) -> CollectorRegistry:
    """This app's registry, made on the first scrape (one per app, so test apps never share counters)."""
    registry = getattr(request.app.state, "metrics_registry", None)
    if registry is None:
        registry = CollectorRegistry()
        services = services_of(request)
        slugs = [tool.slug for tool in services.options.tool.catalogue.tools]
        registry.register(StoreCollector(services.store, slugs))
        limiter = getattr(request.app.state, "rate_limiter", None)
        if limiter is not None:
            registry.register(RateLimitCollector(limiter))
        ProcessCollector(registry=registry)
        request.app.state.metrics_registry = registry
    return registry


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    body = await run_in_threadpool(generate_latest, registry_of(request))
    return Response(body, media_type=CONTENT_TYPE_LATEST)
