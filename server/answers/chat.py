"""A chat completion from a local engine: the chat template, the choices, the response or chunk stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from server.answers.choices import plan, run_all, stream_all
from server.answers.tools import guide_for, parse_calls
from server.engines.base import TokenLogprob
from server.engines.guided import check
from server.protocol import ChatCompletionRequest, new_id, now, usage


async def _plan(handle, body: ChatCompletionRequest):
    engine = handle.engine
    messages = body.template_messages()
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.uses_tools() else None
    ids = await asyncio.to_thread(engine.render_chat, messages, body.add_generation_prompt, tools,
                                  **(body.chat_template_kwargs or {}))
    guide = guide_for(body)
    check(guide, "tools" if body.uses_tools() else "response_format")
    return ids, plan(engine, [ids], body, handle.base, body.logprobs_count(), handle.adapter,
                     adapter_slot=handle.slot, guide=guide)


async def complete(handle, body: ChatCompletionRequest, disconnected: Callable[[], Awaitable[bool]], metrics
                   ) -> dict:
    ids, requests = await _plan(handle, body)
    results = await run_all(handle.engine, requests, disconnected, metrics)
    return {
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": now(),
        "model": handle.name,
        "choices": [_choice(i, r, body) for i, r in enumerate(results)],
        "usage": usage(len(ids), sum(len(r.token_ids) for r in results), requests[0].stats.cached_tokens),
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
    held = [""] * len(requests)  # with tools, a choice's text is parsed for calls when it ends
    generated = 0
    async for i, c in stream_all(engine, requests, metrics):
        generated += len(c.token_ids)
        if body.uses_tools():
            held[i] += c.text
            if c.finish_reason:
                yield chunk([_tool_delta(i, held[i], c.finish_reason, body)])
            continue
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
        yield chunk([], usage=usage(requests[0].stats.prompt_tokens, generated, requests[0].stats.cached_tokens))


def _choice(i: int, r, body: ChatCompletionRequest) -> dict:
    content, calls = _parsed(r.text, body)
    message = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    return {"index": i, "message": message, "logprobs": _logprobs(r.logprobs) if body.logprobs else None,
            "finish_reason": "tool_calls" if calls and r.finish_reason == "stop" else r.finish_reason}


def _tool_delta(i: int, text: str, finish: str, body: ChatCompletionRequest) -> dict:
    """A whole choice in one streamed delta: its content and its calls (OpenAI's stream shape, indexed)."""
    content, calls = _parsed(text, body)
    delta: dict = {"role": "assistant", "content": content}
    if calls:
        delta["tool_calls"] = [{"index": n, **c} for n, c in enumerate(calls)]
    return {"index": i, "delta": delta, "logprobs": None,
            "finish_reason": "tool_calls" if calls and finish == "stop" else finish}


def _parsed(text: str, body: ChatCompletionRequest) -> tuple[str | None, list[dict] | None]:
    try:
        return parse_calls(text, body)
    except ValueError:  # a forced call cut short (max_tokens): the text as it is, no call
        return text, None


def _logprobs(items: list[TokenLogprob]) -> dict:
    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {"content": [{**entry(t.token, t.logprob), "top_logprobs": [entry(s, v) for s, v in t.top]}
                        for t in items]}
