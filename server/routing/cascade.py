"""The `cascade` policy: the student answers first; when it is not confident enough (mean or minimum
token logprob under the threshold) the teacher answers instead.

Non-streamed, the decision follows the student's whole answer. Streamed, it follows the student's
first K tokens, before anything reaches the client: a confident student's buffered chunks are sent
and its stream continues; otherwise the student's stream is closed (its generation aborted) and the
teacher streams from the start."""

from __future__ import annotations

from collections.abc import AsyncIterator

from server.engines.remote import UpstreamUnavailable
from server.model_config import CascadePolicy
from server.routing.accounting import completion_tokens
from server.routing.confidence import confidence, response_confidence, token_logprobs
from server.routing.router import Decision, Router, Run


def with_logprobs(kind: str, body):
    """The student's request: the same, but asking for the logprobs its confidence is read from."""
    if kind == "chat":
        return body.model_copy(update={"logprobs": True})
    return body.model_copy(update={"logprobs": body.logprobs if body.logprobs is not None else 0})


def asked_logprobs(kind: str, body) -> bool:
    return bool(body.logprobs) if kind == "chat" else body.logprobs is not None


def _strip(item: dict) -> dict:
    for choice in item.get("choices", []):
        choice["logprobs"] = None
    return item


async def run_cascade(router: Router, name: str, policy: CascadePolicy, call, run: Run):
    kind, body = call.kind, call.body
    metrics = router.state.metrics
    why = router.unavailable(policy.student)
    if why is not None:  # no point asking a student that cannot answer now
        decision = Decision(name, policy.student, "cascade", "cascade")
        return await router.run_first(router.fell_back(decision, policy.student, policy.teacher, why),
                                      [policy.teacher], body, run)
    student_body = router.book.request_body(name, with_logprobs(kind, body))
    keep_logprobs = asked_logprobs(kind, body)
    try:
        answer = await run(policy.student, student_body)
        if body.stream:
            head, score, events, student_tokens = await _first_tokens(answer.events, policy)
        else:
            result = answer.result
            score = response_confidence(result, policy.metric)
            student_tokens = completion_tokens(result) or 0
    except UpstreamUnavailable:
        decision = Decision(name, policy.student, "cascade", "cascade")
        return await router.run_first(router.fell_back(decision, policy.student, policy.teacher, "unreachable"),
                                      [policy.teacher], body, run)
    metrics.cascade_confidence.labels(name).observe(score)
    if score >= policy.threshold:
        decision = Decision(name, policy.student, f"confident {policy.metric} {score:.3f}>={policy.threshold}",
                            "confident")
        router.record(decision)
        if body.stream:
            answer.events = _replay(head, events, keep_logprobs)
        else:
            answer.result = result if keep_logprobs else _strip(result)
        router.book.settle(decision, answer, body)
        answer.headers.update(decision.header())
        return answer
    if body.stream:
        await events.aclose()  # stop the student's generation; the teacher starts over
    metrics.route_escalations.labels(name).inc()
    decision = Decision(name, policy.teacher, f"escalated {policy.metric} {score:.3f}<{policy.threshold}",
                        "escalated")
    return await router.run_first(decision, [policy.teacher], body, run,
                                  spent_before=[(policy.student, student_tokens)])


async def _first_tokens(events: AsyncIterator[dict], policy: CascadePolicy):
    """Buffer chunks until K tokens (or the end); return them, the confidence, the rest and the tokens seen."""
    head: list[dict] = []
    values: list[float] = []
    async for item in events:
        head.append(item)
        for choice in item.get("choices", []):
            values.extend(token_logprobs(choice))
        if len(values) >= policy.first_tokens:
            break
    return head, confidence(values, policy.metric), events, len(values)


async def _replay(head: list[dict], events: AsyncIterator[dict], keep_logprobs: bool) -> AsyncIterator[dict]:
    try:
        for item in head:
            yield item if keep_logprobs else _strip(item)
        async for item in events:
            yield item if keep_logprobs else _strip(item)
    finally:
        await events.aclose()
