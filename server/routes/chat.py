"""POST /v1/chat/completions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request

from server.auth import ClientAuth, State
from server.engines.base import TokenLogprob
from server.protocol import ChatCompletionRequest, new_id, now, usage
from server.routes.sse import event, sse_response
from server.serving import plan, run_all, stream_all

router = APIRouter(dependencies=[ClientAuth])


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, state: State):
    target = await state.resolve(body.model)
    engine = target.engine
    messages = [{**m.model_dump(exclude_none=True), "content": m.text()} for m in body.messages]
    ids = await asyncio.to_thread(engine.render_chat, messages, body.add_generation_prompt,
                                  **(body.chat_template_kwargs or {}))
    requests = plan(engine, [ids], body, target.base, body.logprobs_count(), target.adapter)
    rid, created = new_id("chatcmpl"), now()
    if body.stream:
        return sse_response(_stream(engine, requests, body, rid, created, state))
    results = await run_all(engine, requests, request, state.metrics)
    completion_tokens = sum(len(r.token_ids) for r in results)
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": body.model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": r.text},
                "logprobs": _logprobs(r.logprobs) if body.logprobs else None,
                "finish_reason": r.finish_reason,
            }
            for i, r in enumerate(results)
        ],
        "usage": usage(len(ids), completion_tokens),
    }


async def _stream(engine, requests, body: ChatCompletionRequest, rid: str, created: int, state
                  ) -> AsyncIterator[str]:
    def chunk(choices: list, **extra) -> str:
        return event({"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                      "choices": choices, **extra})

    for i in range(len(requests)):
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])
    generated = 0
    async for i, c in stream_all(engine, requests, state.metrics):
        generated += len(c.token_ids)
        if c.text or c.finish_reason or (body.logprobs and c.logprobs):
            delta = {"content": c.text} if c.text else {}
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
