"""POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server import dispatch
from server.auth import ClientAuth, State
from server.protocol import ChatCompletionRequest
from server.routes.reply import call_of, reply

router = APIRouter(dependencies=[ClientAuth])


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, state: State):
    return reply(await dispatch.answer(state, call_of("chat", body, request)), body)
