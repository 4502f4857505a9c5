"""GET /health (alive), /ready (models loaded and engines running), /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from server.auth import ClientAuth, State

router = APIRouter()


@router.get("/health")
async def health():
    return {"status": "ok"}


@router.get("/ready")
async def ready(state: State):
    engines_ok = {m: e.health() for m, e in state.engines.items()}
    ok = state.ready and bool(engines_ok) and all(engines_ok.values())
    return JSONResponse({"ready": ok, "models": engines_ok}, status_code=200 if ok else 503)


@router.get("/metrics", dependencies=[ClientAuth])
async def metrics(state: State):
    body = state.metrics.render({m: e.stats() for m, e in state.engines.items()}, state.settings.max_loras)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
