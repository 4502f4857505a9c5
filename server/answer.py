"""One served model answers one OpenAI request: a local engine (through the route modules' own
code) or a remote upstream. Both give the same shapes: a response dict, or an async iterator of
chunk dicts that was validated before it was returned (so bad requests are HTTP errors)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request

from server.engines.remote import RemoteEngine
from server.errors import APIError
from server.request_context import current
from server.routes import chat, completions

LOCAL = {"chat": chat, "completions": completions}


def wire_body(body) -> dict:
    """The request as the client sent it (fields it set), for an upstream."""
    return body.model_dump(exclude_unset=True, exclude_none=True)


async def complete(kind: str, target, body, http: Request, state, name: str) -> dict:
    if isinstance(target.engine, RemoteEngine):
        current().recorded = True
        try:
            result = await target.engine.complete(kind, wire_body(body))
        except APIError as exc:
            _count(state, name, exc.status_code)
            raise
        _count(state, name, 200)
        return result
    return await LOCAL[kind].complete_local(target, body, http, state, name)


async def open_stream(kind: str, target, body, state, name: str) -> AsyncIterator[dict]:
    if isinstance(target.engine, RemoteEngine):
        current().recorded = True
        try:
            events = await target.engine.open_stream(kind, wire_body(body))
        except APIError as exc:
            _count(state, name, exc.status_code)
            raise
        return _counted(events, state, name)
    return await LOCAL[kind].open_local_stream(target, body, state, name)


def _count(state, name: str, status: int) -> None:
    """Remote requests are counted here (local ones by the engine's own stats, in serving.py)."""
    state.metrics.requests.labels(name, "", str(status)).inc()


async def _counted(events: AsyncIterator[dict], state, name: str) -> AsyncIterator[dict]:
    status = 499  # the client went away unless the stream ends or fails
    try:
        async for item in events:
            yield item
        status = 200
    except APIError as exc:
        status = exc.status_code
        raise
    finally:
        await events.aclose()
        _count(state, name, status)
