"""A chat completion from a local engine: the chat template, the choices, the response or chunk stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from server.answers.choices import plan, run_all, stream_all
from server.engines.base import TokenLogprob
from server.protocol import ChatCompletionRequest, new_id, now, usage


async def _plan(handle, body: ChatCompletionRequest):
    engine = handle.engine
    messages = body.template_messages()
    ids = await asyncio.to_thread(engine.render_chat, messages, body.add_generation_prompt,
                                  **(body.chat_template_kwargs or {}))
    return ids, plan(engine, [ids], body, handle.base, body.logprobs_count(), handle.adapter,
                     adapter_slot=handle.slot)


async def complete(handle, body: ChatCompletionRequest, disconnected: Callable[[], Awaitable[bool]], metrics
                   ) -> dict:
    ids, requests = await _plan(handle, body)
    results = await run_all(handle.engine, requests, disconnected, metrics)
    return {
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": now(),
        "model": handle.name,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": r.text},
                "logprobs": _logprobs(r.logprobs) if body.logprobs else None,
                "finish_reason": r.finish_reason,
            }
            for i, r in enumerate(results)
        ],
        "usage": usage(len(ids), sum(len(r.token_ids) for r in results)),
    }


async def open_stream(handle, body: ChatCompletionRequest, metrics) -> AsyncIterator[dict]:
    """Validate now (errors are raised before any chunk), stream later."""
    _, requests = await _plan(handle, body)
    return _stream(handle.engine, requests, body, new_id("chatcmpl"), now(), metrics, handle.name)


async def _stream(engine, requests, body: ChatCompletionRequest, rid: str, created: int, metrics, name: str
                  ) -> AsyncIterator[dict]:
    def chunk(choices: list, **extra) -> dict:
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                "choices": choices, **extra}

    started = [False] * len(requests)
    generated = 0
    async for i, c in stream_all(engine, requests, metrics):
        generated += len(c.token_ids)
        # The role goes out with a choice's first output, as vLLM does: a client timing the first chunk
        # (vLLM's bench, TTFT dashboards) measures the first token, not the time to accept the request.
        first = not started[i]
        started[i] = True
        if first or c.text or c.finish_reason or (body.logprobs and c.logprobs):
            delta = {"role": "assistant", "content": c.text} if first else {"content": c.text} if c.text else {}
            yield chunk([{"index": i, "delta": delta,
                          "logprobs": _logprobs(c.logprobs) if body.logprobs and c.logprobs else None,
                          "finish_reason": c.finish_reason}])
    if body.stream_options and body.stream_options.include_usage:
        yield chunk([], usage=usage(requests[0].stats.prompt_tokens, generated))


def _logprobs(items: list[TokenLogprob]) -> dict:
    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {"content": [{**entry(t.token, t.logprob), "top_logprobs": [entry(s, v) for s, v in t.top]}
                        for t in items]}
