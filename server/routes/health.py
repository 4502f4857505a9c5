"""GET /health (alive), /ready (models loaded and engines running), /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from server.auth import State, require_client_key

router = APIRouter()


@router.get("/health")
async def health():
    return {"status": "ok"}


@router.get("/ready")
async def ready(state: State):
    engines_ok = {m: e.health() for m, e in state.engines.items()}
    # a remote upstream being down does not make this server unready: the router falls back around it
    local = [ok for m, ok in engines_ok.items() if state.engines[m].capabilities.local]
    ok = state.ready and not state.draining and bool(engines_ok) and all(local)
    return JSONResponse({"ready": ok, "draining": state.draining, "models": engines_ok},
                        status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(request: Request, state: State):
    if not state.settings.metrics_public:
        require_client_key(request, state)
    body = state.metrics.render({m: e.stats() for m, e in state.engines.items()}, state.settings.max_loras)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
