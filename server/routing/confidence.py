"""How sure a model was of its own answer, from the token logprobs in an OpenAI response or chunk."""

from __future__ import annotations

import math

METRICS = ("mean_logprob", "min_logprob")


def token_logprobs(choice: dict) -> list[float]:
    """The sampled tokens' logprobs in one choice (chat or completions shape, whole or chunk)."""
    lp = choice.get("logprobs")
    if not lp:
        return []
    if "content" in lp:  # chat
        return [float(t["logprob"]) for t in lp["content"] or []]
    return [float(v) for v in lp.get("token_logprobs") or [] if v is not None]  # completions


def confidence(values: list[float], metric: str) -> float:
    """Mean or minimum token logprob; an answer with no tokens counts as certain (0.0)."""
    if metric not in METRICS:
        raise ValueError(f"unknown confidence metric {metric!r}; expected one of {METRICS}")
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return 0.0
    return min(finite) if metric == "min_logprob" else sum(finite) / len(finite)


def response_confidence(response: dict, metric: str) -> float:
    """Every choice must be confident: the least confident choice decides."""
    scores = [confidence(token_logprobs(c), metric) for c in response.get("choices", [])]
    return min(scores) if scores else 0.0
