"""Runtime adapter management, vLLM-compatible: POST /v1/load_lora_adapter and /v1/unload_lora_adapter."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from server.auth import AdminAuth, State

router = APIRouter(dependencies=[AdminAuth])


class LoadLoRARequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(..., max_length=256)
    lora_path: str = Field(..., max_length=4096)
    load_inplace: bool = False
    pinned: bool = False
    base_model: str | None = None


class UnloadLoRARequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(..., max_length=256)
    lora_int_id: int | None = None  # accepted for vLLM clients; the name decides
    base_model: str | None = None


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadLoRARequest, state: State):
    registry = state.registry(body.base_model)
    ref = await registry.load(body.lora_name, body.lora_path, pinned=body.pinned, replace=body.load_inplace)
    return {"status": "loaded", "lora_name": ref.name, "parent": ref.base, "rank": ref.rank,
            "pinned": ref.pinned, "bytes": ref.nbytes}


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoRARequest, state: State):
    registry = state.registry(body.base_model)
    await registry.unload(body.lora_name)
    return {"status": "unloaded", "lora_name": body.lora_name}
