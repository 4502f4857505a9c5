"""The router's cost book: for each routed answer, the reference's cost of the tokens served against
what the targets spent, into `x-slimserve-route` (`cost_saved`, a fraction) and the metrics.

A whole answer's usage gives its tokens, so its header figure is exact. A stream's header leaves
before its length is known: it carries the per-token figure of the target that streams (1 - its
cost / the reference's), and the stream, asked internally for its usage chunk (dropped again unless
the client asked for it), settles the metrics when it ends. A stream the client abandons is not
counted; the first tokens of a streamed student that was escalated are (they were spent)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

from server.routing.cost import ModelCost, fraction, model_costs, reference_of

log = logging.getLogger(__name__)


def asked_usage(body) -> bool:
    return bool(body.stream and body.stream_options and body.stream_options.include_usage)


def with_usage(body):
    """A streamed request that reports its usage at the end (what the book reads)."""
    if not body.stream or asked_usage(body):
        return body
    from server.protocol import StreamOptions

    continuous = bool(body.stream_options and body.stream_options.continuous_usage_stats)
    return body.model_copy(update={"stream_options": StreamOptions(include_usage=True,
                                                                   continuous_usage_stats=continuous)})


def completion_tokens(result: dict) -> int | None:
    usage = result.get("usage") or {}
    return usage.get("completion_tokens")


class CostBook:
    def __init__(self, router_settings, settings, engines: dict, metrics):
        self.costs: dict[str, ModelCost] = model_costs(settings, engines)
        self.references = {name: reference_of(policy, self.costs)
                           for name, policy in router_settings.policies.items()}
        self.metrics = metrics
        for name, cost in self.costs.items():
            log.info("cost of %s: %.4g s/token (%s)", name, cost.seconds_per_token, cost.measured or "as configured")

    def priced(self, policy: str, target: str, spent_before: list[tuple[str, int]] = ()) -> bool:
        ref = self.references.get(policy)
        return ref is not None and all(t in self.costs for t in (target, *(t for t, _ in spent_before)))

    def request_body(self, policy: str, body):
        """The body to send: streams of a priced policy report their usage."""
        return with_usage(body) if body.stream and self.references.get(policy) else body

    def settle(self, decision, answer, client_body, spent_before: list[tuple[str, int]] = ()) -> None:
        """Set decision.cost_saved; record the metrics now (whole answer) or when the stream ends. A stream
        is always wrapped: it may carry a usage chunk the book asked for (dropped unless the client did)."""
        priced = self.priced(decision.policy, decision.target, spent_before)
        if priced:
            per_token = {t: self.costs[t].seconds_per_token for t in {decision.target, *(t for t, _ in spent_before)}}
            reference = self.costs[self.references[decision.policy]].seconds_per_token

        def book(tokens: int) -> float | None:
            spent: dict[str, float] = {}
            for target, n in [*spent_before, (decision.target, tokens)]:
                spent[target] = spent.get(target, 0.0) + per_token[target] * n
            self.metrics.route_cost(decision.policy, reference * tokens, spent)
            return fraction(reference * tokens, sum(spent.values()))

        if answer.result is not None:
            tokens = completion_tokens(answer.result)
            if priced and tokens is not None:
                decision.cost_saved = book(tokens)
            return
        if priced:
            decision.cost_saved = 1.0 - per_token[decision.target] / reference
        answer.events = _counted(answer.events, asked_usage(client_body), book if priced else None)


async def _counted(events: AsyncIterator[dict], keep_usage: bool, done: Callable[[int], object] | None):
    tokens = None
    try:
        async for item in events:
            usage = item.get("usage")
            if usage:
                tokens = usage.get("completion_tokens", tokens)
                if not item.get("choices") and not keep_usage:
                    continue  # the usage chunk the book asked for, not the client
            yield item
    finally:
        await events.aclose()
        if tokens is not None and done is not None:
            done(tokens)

