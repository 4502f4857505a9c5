"""POST /v1/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server import dispatch
from server.auth import ClientAuth, State
from server.protocol import CompletionRequest
from server.routes.reply import call_of, reply

router = APIRouter(dependencies=[ClientAuth])


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, state: State):
    return reply(await dispatch.answer(state, call_of("completions", body, request)), body)
