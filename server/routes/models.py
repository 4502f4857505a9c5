"""GET /v1/models: base models, and each resident adapter with its parent."""

from __future__ import annotations

from fastapi import APIRouter

from server.auth import ClientAuth, State
from server.errors import NotFound

router = APIRouter(dependencies=[ClientAuth])


def _cards(state) -> list[dict]:
    cards = []
    for model_id, engine in state.engines.items():
        cards.append({"id": model_id, "object": "model", "created": state.created,
                      "owned_by": "slimserve" if engine.capabilities.local else "remote",
                      "root": getattr(engine, "source", "") or model_id, "parent": None,
                      "max_model_len": engine.max_model_len or None,
                      "quantization": getattr(engine, "quantization", None), "weight_bytes": engine.weight_bytes,
                      **_dtype_fields(engine)})
    if state.routing is not None:
        for model_id in state.routing.model_ids():
            cards.append({"id": model_id, "object": "model", "created": state.created, "owned_by": "slimserve",
                          "root": "router", "parent": None, "policy": state.routing.policy(model_id)[0]})
    for registry in state.adapters.values():
        for ref in registry.list():
            cards.append({"id": ref.name, "object": "model", "created": int(ref.loaded_at), "owned_by": "slimserve",
                          "root": str(ref.path), "parent": ref.base, "max_model_len": state.engines[ref.base].max_model_len,
                          "lora_rank": ref.rank, "pinned": ref.pinned, "source": ref.source})
    return cards


def _dtype_fields(engine) -> dict:
    """The PyTorch engine's dtype and why it was chosen (`dtype: auto` decides per device), the kernels
    that run load-time int8/int4, the full-precision linears and attention, and what speculates."""
    choice = getattr(engine, "dtype_choice", None)
    fields = {"dtype": choice.name, "dtype_reason": choice.reason} if choice is not None else {}
    if getattr(engine, "quantization_kernel", None):
        fields["quantization_kernel"] = engine.quantization_kernel
    if getattr(engine, "linear_kernel", None):
        fields["linear_kernel"] = engine.linear_kernel
    if getattr(engine, "attention_kernel", None):
        fields["attention_kernel"] = engine.attention_kernel
    if getattr(engine, "decode_step", None):
        fields["decode_step"] = engine.decode_step
    if getattr(engine, "speculation", None):
        fields["speculation"] = engine.speculation
    return fields


@router.get("/v1/models")
async def list_models(state: State):
    return {"object": "list", "data": _cards(state)}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, state: State):
    for card in _cards(state):
        if card["id"] == model_id:
            return card
    raise NotFound(f"the model '{model_id}' does not exist", param="model", code="model_not_found")
