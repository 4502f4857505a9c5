"""One path from a route to an engine: resolve the request's target once into a Handle, run it, and
hand back plain results (a response dict or a stream of chunk dicts) that the route turns into JSON
or SSE.

`model` names a served model, one of its adapters, or `auto[:policy]`, whose routing policy picks the
target. A handle holds the engine and, for an adapter, its slot for the whole request: an adapter
replaced or evicted meanwhile keeps serving the requests that started on it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from server.answers import chat, completions
from server.engines.base import Engine
from server.errors import APIError, NotFound, Overloaded
from server.http_errors import status_of
from server.model_config import AUTO
from server.request_context import current

LOCAL = {"chat": chat, "completions": completions}


@dataclass
class Call:
    """What a route hands down besides the body: the kind, the request headers (for routing rules) and
    a way to learn that the client went away."""

    kind: str  # chat | completions
    body: object
    headers: dict[str, str]
    disconnected: Callable[[], Awaitable[bool]]


@dataclass
class Handle:
    name: str  # the id the client asked for, reported back as `model`
    engine: Engine
    base: str
    adapter: str | None = None
    slot: int | None = None  # held from resolve() to release()

    def release(self) -> None:
        if self.slot is not None:
            self.engine.adapter_slots.release(self.slot)
            self.slot = None


@dataclass
class Answer:
    result: dict | None = None  # a whole response
    events: AsyncIterator[dict] | None = None  # or its chunks, validated before the first one
    headers: dict[str, str] = field(default_factory=dict)


def is_auto(model: str) -> bool:
    return model == AUTO or model.startswith(AUTO + ":")


async def answer(state, call: Call) -> Answer:
    if is_auto(call.body.model):
        return await state.router().answer(call, lambda name, body: run_named(state, call, name, body))
    return await run_named(state, call, call.body.model, call.body)


async def run_named(state, call: Call, name: str, body) -> Answer:
    handle = await resolve(state, name)
    return await run(state, handle, call, body)


async def resolve(state, model: str) -> Handle:
    if state.draining:
        raise Overloaded("the server is shutting down; retry on another replica", code="shutting_down")
    if not state.ready:
        raise Overloaded("the server is starting; models are not loaded yet")
    engine = state.engines.get(model)
    if engine is not None:
        return Handle(model, engine, model)
    for base, registry in _registries_for(state, model):
        ref = await registry.resolve(model)
        if ref is None:
            continue
        engine = state.engines[base]
        slot = engine.adapter_slots.acquire(ref.name)
        if slot is None:  # unloaded between the two lines above
            break
        return Handle(model, engine, base, ref.name, slot)
    routed = state.routing.model_ids() if state.routing is not None else []
    adapters = [r.name for reg in state.adapters.values() for r in reg.list()]
    known = ", ".join(sorted([*state.engines, *routed, *adapters]))
    raise NotFound(f"the model '{model}' does not exist; served models: {known or 'none'}", param="model",
                   code="model_not_found")


def _registries_for(state, name: str) -> list:
    """Registries to try for an adapter: where it is resident; else, for one loaded just in time, the
    base model its adapter_config names first (not whichever base happens to be listed first)."""
    items = list(state.adapters.items())
    for base, registry in items:
        if name in registry.refs:
            return [(base, registry)]
    declared = next((d for _, r in items if (d := r.declared_base(name))), None)

    def serves(base: str) -> bool:
        source = str(getattr(state.engines[base], "source", "") or "")
        return declared is not None and declared in (base, source, Path(source).name)

    return sorted(items, key=lambda item: not serves(item[0]))


async def run(state, handle: Handle, call: Call, body) -> Answer:
    """Run one target. The handle is released when the answer is complete (or its stream closed)."""
    try:
        if not handle.engine.capabilities.local:
            return await _run_remote(state, handle, call.kind, body)
        module = LOCAL[call.kind]
        if body.stream:
            events = await module.open_stream(handle, body, state.metrics)
            held, handle = handle, None  # the stream releases it
            return Answer(events=_releasing(events, held))
        return Answer(result=await module.complete(handle, body, call.disconnected, state.metrics))
    finally:
        if handle is not None:
            handle.release()


async def _releasing(events: AsyncIterator[dict], handle: Handle) -> AsyncIterator[dict]:
    try:
        async for item in events:
            yield item
    finally:
        await events.aclose()
        handle.release()


# ---- remote upstreams: whole OpenAI requests ------------------------------------------------------
def wire_body(body) -> dict:
    """The request as the client sent it (fields it set), for an upstream."""
    return body.model_dump(exclude_unset=True, exclude_none=True)


async def _run_remote(state, handle: Handle, kind: str, body) -> Answer:
    current().recorded = True  # counted here, by status
    try:
        if body.stream:
            events = await handle.engine.open_stream(kind, wire_body(body))
            return Answer(events=_counted(events, state, handle.name))
        result = await handle.engine.complete(kind, wire_body(body))
    except APIError as exc:
        _count(state, handle.name, status_of(exc))
        raise
    _count(state, handle.name, 200)
    return Answer(result=result)


def _count(state, name: str, status: int) -> None:
    state.metrics.requests.labels(name, "", str(status)).inc()


async def _counted(events: AsyncIterator[dict], state, name: str) -> AsyncIterator[dict]:
    status = 499  # the client went away unless the stream ends or fails
    try:
        async for item in events:
            yield item
        status = 200
    except APIError as exc:
        status = status_of(exc)
        raise
    finally:
        await events.aclose()
        _count(state, name, status)
