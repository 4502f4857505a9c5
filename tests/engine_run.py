"""Drive an in-process engine directly: greedy token ids for (prompt, adapter) items sent together; a
draft cost model under which prompt lookup checks every draft."""

from __future__ import annotations

import asyncio

import torch

from server.engines.base import GenerationRequest, RequestStats, SamplingParams
from server.engines.torch.prompt_lookup import StepCost


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


def prompt_logits(engine, text: str) -> torch.Tensor:
    """The engine's model's next-token logits [positions, vocab] over `text`, in fp32."""
    ids = torch.tensor([engine.tokenizer.encode(text)])
    with torch.no_grad():
        return engine.model(ids).logits.float()[0]


def mean_kl(p: torch.Tensor, q: torch.Tensor) -> float:
    """Mean KL(p || q) per position, from logits."""
    return float(torch.nn.functional.kl_div(q.log_softmax(-1), p.log_softmax(-1), log_target=True,
                                            reduction="none").sum(-1).mean())


class FreeTokens(StepCost):
    """Extra tokens and draft checks cost nothing: every draft is checked whole (the cost-based width would
    skip most drafts of these low-acceptance models, and these tests are about exactness)."""

    def shares(self) -> tuple[float, float]:
        return 0.0, 0.0
