"""GET /v1/models."""

from __future__ import annotations

from fastapi import APIRouter

from server.auth import ClientAuth, State
from server.errors import NotFound

router = APIRouter(dependencies=[ClientAuth])


def _card(model_id: str, engine, created: int) -> dict:
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "slimserve",
        "root": getattr(engine, "source", "") or model_id,
        "parent": None,
        "max_model_len": engine.max_model_len,
    }


@router.get("/v1/models")
async def list_models(state: State):
    return {"object": "list", "data": [_card(m, e, state.created) for m, e in state.engines.items()]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, state: State):
    engine = state.engines.get(model_id)
    if engine is None:
        raise NotFound(f"the model '{model_id}' does not exist", param="model", code="model_not_found")
    return _card(model_id, engine, state.created)
