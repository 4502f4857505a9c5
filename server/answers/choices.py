"""What local chat and completions answers share: planning choices, running them, streaming them,
recording metrics.

A request becomes one GenerationRequest per (prompt, n) choice. Validation (context length) happens
here, before any work starts, so errors are 400s rather than broken streams.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from server.engines.base import Chunk, Engine, GenerationRequest, RequestStats, TokenLogprob
from server.errors import APIError, BadRequest
from server.http_errors import status_of
from server.limits import admit
from server.request_context import current
from server.metrics import Metrics
from server.protocol import new_id

log = logging.getLogger(__name__)
CLIENT_CLOSED = 499


@dataclass
class ChoiceResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_logprobs: list[TokenLogprob] | None = None


def plan(engine: Engine, prompts: list[list[int]], body, model_name: str, logprobs: int | None,
         adapter: str | None = None, prompt_logprobs: int | None = None, adapter_slot: int | None = None,
         guide=None) -> list[GenerationRequest]:
    """One GenerationRequest per prompt x n, each checked against the context length."""
    requested = body.requested_max_tokens()
    requests = []
    for p_index, ids in enumerate(prompts):
        if not ids:
            raise BadRequest("prompt is empty after tokenization", param="prompt")
        room = engine.max_model_len - len(ids)
        if room < (0 if requested == 0 else 1) or (requested is not None and requested > room):
            want = requested if requested is not None else 1
            raise BadRequest(
                f"this model's maximum context length is {engine.max_model_len} tokens; the request has "
                f"{len(ids)} prompt tokens and asks for {want} more ({len(ids) + want} in all)",
                param="max_tokens", code="context_length_exceeded")
        for n_index in range(body.n):
            index = p_index * body.n + n_index
            stats = RequestStats(model=model_name, adapter=adapter or "", prompt_tokens=len(ids))
            params = body.sampling(requested if requested is not None else room, logprobs, index,
                                   getattr(engine, "sampling_defaults", None), prompt_logprobs, guide)
            requests.append(GenerationRequest(new_id("gen"), list(ids), params, stats, adapter, adapter_slot,
                                              fault=current().fault))
    admit(engine, prompts, len(requests))  # prompt-token and waiting-queue bounds (429 + Retry-After)
    current().recorded = True  # from here on run_all/stream_all record it (metrics.record)
    return requests


async def run_all(engine: Engine, requests: list[GenerationRequest], disconnected: Callable[[], Awaitable[bool]],
                  metrics: Metrics) -> list[ChoiceResult]:
    """Run every choice to the end; a client that disconnects aborts them all."""
    results = [ChoiceResult() for _ in requests]

    async def collect(i: int, req: GenerationRequest) -> None:
        async for chunk in engine.generate(req):
            _add(results[i], chunk)

    tasks = [asyncio.create_task(collect(i, r)) for i, r in enumerate(requests)]
    watcher = asyncio.create_task(_wait_disconnect(disconnected))
    status = 200
    try:
        done, _ = await asyncio.wait([watcher, asyncio.gather(*tasks)], return_when=asyncio.FIRST_COMPLETED)
        if watcher in done:
            status = CLIENT_CLOSED
            raise asyncio.CancelledError("client disconnected")
        for t in tasks:
            t.result()  # re-raise the first engine error
        return results
    except APIError as exc:
        status = status_of(exc)
        raise
    except BaseException:
        status = CLIENT_CLOSED if status == 200 else status
        raise
    finally:
        watcher.cancel()
        for t in tasks:
            t.cancel()  # cancelling a generate() aborts its sequence in the engine
        _record(metrics, requests, status)


async def stream_all(engine: Engine, requests: list[GenerationRequest], metrics: Metrics
                     ) -> AsyncIterator[tuple[int, Chunk]]:
    """Yield (choice index, chunk) from all choices as they come; errors propagate to the caller."""
    queue: asyncio.Queue = asyncio.Queue()
    sentinel = object()

    async def pump(i: int, req: GenerationRequest) -> None:
        try:
            async for chunk in engine.generate(req):
                await queue.put((i, chunk))
        except BaseException as exc:
            await queue.put(exc)
        finally:
            await queue.put(sentinel)

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
    open_count = len(tasks)
    status = CLIENT_CLOSED
    try:
        while open_count:
            item = await queue.get()
            if item is sentinel:
                open_count -= 1
            elif isinstance(item, BaseException):
                if isinstance(item, asyncio.CancelledError):
                    continue
                raise item
            else:
                yield item
        status = 200
    except APIError as exc:
        status = status_of(exc)
        raise
    except Exception:
        status = 500
        raise
    finally:
        for t in tasks:
            t.cancel()
        _record(metrics, requests, status)


def _record(metrics: Metrics, requests: list[GenerationRequest], status: int) -> None:
    for r in requests:
        if r.stats.finish_reason is None:
            r.stats.finish_reason = "abort" if status == CLIENT_CLOSED else "error"
    metrics.record([r.stats for r in requests], status)


def _add(result: ChoiceResult, chunk: Chunk) -> None:
    result.text += chunk.text
    result.token_ids.extend(chunk.token_ids)
    if chunk.prompt_logprobs:
        result.prompt_logprobs = chunk.prompt_logprobs
    if chunk.logprobs:
        result.logprobs.extend(chunk.logprobs)
    if chunk.finish_reason:
        result.finish_reason = chunk.finish_reason


async def _wait_disconnect(disconnected: Callable[[], Awaitable[bool]]) -> None:
    while not await disconnected():
        await asyncio.sleep(0.25)
