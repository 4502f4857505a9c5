"""What both generation routes share: a dispatch.Call from the HTTP request, and the answer as JSON or SSE."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse

from server.dispatch import Answer, Call
from server.routes.sse import sse_response


def call_of(kind: str, body, request: Request) -> Call:
    return Call(kind, body, {k.lower(): v for k, v in request.headers.items()}, request.is_disconnected)


def reply(answer: Answer):
    if answer.events is not None:
        return sse_response(answer.events, answer.headers)
    return JSONResponse(answer.result, headers=answer.headers or None)
