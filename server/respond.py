"""What both generation routes do: a named model answers directly; `auto` and `auto:<policy>` go
through the router, which also says in a header what served the request and why."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse

from server.answer import complete, open_stream
from server.model_config import AUTO
from server.routes.sse import sse_response

def is_auto(model: str) -> bool:
    return model == AUTO or model.startswith(AUTO + ":")


async def respond(kind: str, body, request: Request, state):
    if is_auto(body.model):
        return await state.router().respond(kind, body, request, state)
    target = await state.resolve(body.model)
    if body.stream:
        return sse_response(await open_stream(kind, target, body, state, body.model))
    return JSONResponse(await complete(kind, target, body, request, state, body.model))
