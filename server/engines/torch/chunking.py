"""Chunked prefill: how many prompt tokens each prefilling sequence computes in the next step.

With rows decoding, a step prefills at most `budget` prompt tokens (vLLM's max_num_batched_tokens), in
arrival order, so a long prompt costs the running rows one chunk's forward per token they produce
instead of its whole prefill. With nothing decoding there is no one to stall and the budget is the
larger prefill bound. No torch here.
"""

from __future__ import annotations


def plan_chunks(remaining: list[int], budget: int) -> list[int]:
    """Tokens each sequence computes this step (0: it waits); the first always gets at least one."""
    plan, left = [], max(1, budget)
    for need in remaining:
        take = min(need, left)
        plan.append(take)
        left -= take
    return plan
