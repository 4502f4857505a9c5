"""One served model answers one OpenAI request: a local engine (through the route modules' own
code) or a remote upstream. Both give the same shapes: a response dict, or an async iterator of
chunk dicts that was validated before it was returned (so bad requests are HTTP errors)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request

from server.engines.remote import RemoteEngine
from server.routes import chat, completions

LOCAL = {"chat": chat, "completions": completions}


def wire_body(body) -> dict:
    """The request as the client sent it (fields it set), for an upstream."""
    return body.model_dump(exclude_unset=True, exclude_none=True)


async def complete(kind: str, target, body, http: Request, state, name: str) -> dict:
    if isinstance(target.engine, RemoteEngine):
        return await target.engine.complete(kind, wire_body(body))
    return await LOCAL[kind].complete_local(target, body, http, state, name)


async def open_stream(kind: str, target, body, state, name: str) -> AsyncIterator[dict]:
    if isinstance(target.engine, RemoteEngine):
        return await target.engine.open_stream(kind, wire_body(body))
    return await LOCAL[kind].open_local_stream(target, body, state, name)
