"""A text completion from a local engine: prompts, echo and prompt scoring, the response or chunk stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from server.answers.choices import plan, run_all, stream_all
from server.engines.base import TokenLogprob
from server.protocol import CompletionRequest, new_id, now, require, usage


async def _plan(handle, body: CompletionRequest):
    engine = handle.engine
    prompts = []
    for p in body.prompts():
        if isinstance(p, str):
            prompts.append(await asyncio.to_thread(engine.encode, p))
        else:
            require(all(0 <= t < 2**31 for t in p), "token ids must be non-negative integers", "prompt")
            prompts.append(list(p))
    requests = plan(engine, prompts, body, handle.base, body.logprobs, handle.adapter, body.prompt_logprobs(),
                    adapter_slot=handle.slot)
    echoes = [engine.decode(p) if body.echo else "" for p in prompts]
    return prompts, requests, echoes


async def complete(handle, body: CompletionRequest, disconnected: Callable[[], Awaitable[bool]], metrics) -> dict:
    prompts, requests, echoes = await _plan(handle, body)
    results = await run_all(handle.engine, requests, disconnected, metrics)
    choices = []
    for i, r in enumerate(results):
        prefix = echoes[i // body.n]
        choices.append({
            "index": i,
            "text": prefix + r.text,
            "logprobs": _logprobs(r.prompt_logprobs or [], r.logprobs, 0) if body.logprobs is not None else None,
            "finish_reason": r.finish_reason,
        })
    return {
        "id": new_id("cmpl"),
        "object": "text_completion",
        "created": now(),
        "model": handle.name,
        "choices": choices,
        "usage": usage(sum(len(p) for p in prompts) * body.n, sum(len(r.token_ids) for r in results),
                       sum(r.stats.cached_tokens for r in requests)),
    }


async def open_stream(handle, body: CompletionRequest, metrics) -> AsyncIterator[dict]:
    """Validate now (errors are raised before any chunk), stream later."""
    _, requests, echoes = await _plan(handle, body)
    return _stream(handle.engine, requests, body, echoes, new_id("cmpl"), now(), metrics, handle.name)


async def _stream(engine, requests, body: CompletionRequest, echoes: list[str], rid: str, created: int, metrics,
                  name: str) -> AsyncIterator[dict]:
    def chunk(choices: list, **extra) -> dict:
        return {"id": rid, "object": "text_completion", "created": created, "model": name,
                "choices": choices, **extra}

    offsets = [0] * len(requests)
    echoed = [not body.echo] * len(requests)
    generated = 0
    async for i, c in stream_all(engine, requests, metrics):
        if not echoed[i]:  # the echo goes out with the choice's first output, with the prompt's logprobs
            echoed[i] = True
            echo = echoes[i // body.n]
            lp = _logprobs(c.prompt_logprobs, [], 0) if body.logprobs is not None and c.prompt_logprobs else None
            offsets[i] = len(echo)
            yield chunk([{"index": i, "text": echo, "logprobs": lp, "finish_reason": None}])
        generated += len(c.token_ids)
        if c.text or c.finish_reason or (body.logprobs is not None and c.logprobs):
            lp = _logprobs([], c.logprobs, offsets[i]) if body.logprobs is not None and c.logprobs else None
            offsets[i] += len(c.text)
            yield chunk([{"index": i, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason}])
    if body.stream_options and body.stream_options.include_usage:
        prompt_tokens = sum(r.stats.prompt_tokens for r in requests)
        yield chunk([], usage=usage(prompt_tokens, generated, sum(r.stats.cached_tokens for r in requests)))


def _logprobs(prompt: list[TokenLogprob], generated: list[TokenLogprob], start: int) -> dict:
    """OpenAI's completions logprobs. Echoed prompt tokens come first (the first one `null`, nothing
    predicts it), their top entries including the prompt token itself, as vLLM and OpenAI give them."""
    items = [*prompt, *generated]
    offsets, pos = [], start
    for t in items:
        offsets.append(pos)
        pos += len(t.token)
    tops = [None if t.logprob is None else {**dict(t.top), t.token: t.logprob} for t in prompt]
    return {
        "tokens": [t.token for t in items],
        "token_logprobs": [t.logprob for t in items],
        "top_logprobs": tops + [dict(t.top) for t in generated],
        "text_offset": offsets,
    }
