"""Drive an in-process engine directly: greedy token ids for (prompt, adapter) items sent together."""

from __future__ import annotations

import asyncio

from server.engines.base import GenerationRequest, RequestStats, SamplingParams


def greedy_tokens(engine, items: list[tuple[str, str | None]], max_tokens: int = 12) -> list[list[int]]:
    async def one(i, prompt, adapter):
        req = GenerationRequest(f"r{i}-{adapter}", engine.encode(prompt),
                                SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                                RequestStats("tiny"), adapter)
        out = []
        async for chunk in engine.generate(req):
            out.extend(chunk.token_ids)
        return out

    async def run():
        return await asyncio.gather(*[one(i, p, a) for i, (p, a) in enumerate(items)])

    return asyncio.run(run())
