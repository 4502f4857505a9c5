"""The router behind the virtual model `auto`: pick a policy, let it choose, skip targets that are
unhealthy or queued past the limit (fallback), run the target, and say in `x-slimserve-route` what
served the request and why. The response's `model` is the real target.

Targets run through a `run(name, body)` callable that the dispatch layer hands in, so routing knows
neither HTTP nor how a target is reached."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from server.engines.remote import UpstreamUnavailable
from server.errors import ConfigError, NotFound, Overloaded
from server.model_config import AUTO, CascadePolicy, FixedPolicy, LearnedPolicy, RouterSettings, RulesPolicy
from server.routing import rules
from server.routing.accounting import CostBook

log = logging.getLogger(__name__)
ROUTE_HEADER = "x-slimserve-route"
Run = Callable[[str, object], Awaitable[object]]  # (target name, body) -> dispatch.Answer


@dataclass
class Decision:
    policy: str
    target: str
    reason: str  # free text, for the header
    kind: str  # low-cardinality, for metrics
    cost_saved: float | None = None  # share of the reference's cost saved (routing/accounting.py)

    def header(self) -> dict[str, str]:
        value = f"policy={self.policy}; target={self.target}; reason={self.reason}"
        if self.cost_saved is not None:
            value += f"; cost_saved={self.cost_saved:.3f}"
        return {ROUTE_HEADER: value}


class Router:
    def __init__(self, settings: RouterSettings, state):
        self.settings = settings
        self.state = state
        self._learned = {}
        for name, policy in settings.policies.items():
            if isinstance(policy, LearnedPolicy):
                from compress.router_model import LearnedRouter, RouterModelError

                try:
                    self._learned[name] = LearnedRouter.load(policy.path)
                except RouterModelError as exc:
                    raise ConfigError(f"router.policies.{name}.path", str(exc)) from exc
        self.book = CostBook(settings, state.settings, state.engines, state.metrics)

    def model_ids(self) -> list[str]:
        return [AUTO, *(f"{AUTO}:{name}" for name in self.settings.policies)]

    def policy(self, model: str):
        name = model.partition(":")[2] or self.settings.default
        policy = self.settings.policies.get(name)
        if policy is None:
            raise NotFound(f"no routing policy '{name}'; policies: {sorted(self.settings.policies)}",
                           param="model", code="model_not_found")
        return name, policy

    # ---- the request ---------------------------------------------------------------------------
    async def answer(self, call, run: Run):
        """Choose a target for `call` (dispatch.Call), run it, and return its answer with the route header."""
        body = call.body
        name, policy = self.policy(body.model)
        if isinstance(policy, CascadePolicy):
            from server.routing.cascade import run_cascade

            return await run_cascade(self, name, policy, call, run)
        target, reason, reason_kind = await self._choose(name, policy, call)
        order = [target, *self._alternatives(policy, target)]
        return await self.run_first(Decision(name, target, reason, reason_kind), order, body, run)

    async def _choose(self, name: str, policy, call) -> tuple[str, str, str]:
        kind, body = call.kind, call.body
        if isinstance(policy, FixedPolicy):
            return policy.target, "fixed", "fixed"
        if isinstance(policy, RulesPolicy):
            target, reason = rules.decide(policy, await self.facts(call, policy.default))
            return target, reason, reason.replace(" ", "")
        if isinstance(policy, LearnedPolicy):
            learned = self._learned[name]
            text = last_user_text(kind, body)
            p = await self._on_torch_thread(lambda: learned.student_probability(text))
            threshold = policy.threshold if policy.threshold is not None else learned.threshold
            self.state.metrics.route_score.labels(name).observe(p)
            if p >= threshold:
                return policy.student, f"p_student_ok {p:.3f}>={threshold:.3f}", "learned_student"
            return policy.teacher, f"p_student_ok {p:.3f}<{threshold:.3f}", "learned_teacher"
        raise TypeError(f"unknown policy {policy!r}")

    async def _on_torch_thread(self, fn):
        """Torch work belongs on an engine thread (a second thread running OpenMP slows every engine step)."""
        engine = next((e for e in self.state.engines.values() if hasattr(e, "run_job")), None)
        return await (engine.run_job(fn) if engine is not None else asyncio.to_thread(fn))

    def _alternatives(self, policy, target: str) -> list[str]:
        if isinstance(policy, (FixedPolicy, RulesPolicy)):
            pool = [*policy.fallback]
            if isinstance(policy, RulesPolicy):
                pool += [policy.default, *(r.target for r in policy.rules)]
        else:
            pool = [policy.student, policy.teacher]
        seen, out = {target}, []
        for name in pool:
            if name not in seen:
                seen.add(name)
                out.append(name)
        return out

    # ---- fallback and answering ----------------------------------------------------------------
    def unavailable(self, name: str) -> str | None:
        """Why this target should be skipped now, or None."""
        engine = self.state.engines[name]
        if not engine.health():
            return "unhealthy"
        if engine.capabilities.local and engine.stats().waiting > self.settings.fallback.max_waiting:
            return "queue_full"
        return None

    def record(self, decision: Decision) -> None:
        self.state.metrics.route_decisions.labels(decision.policy, decision.target, decision.kind).inc()

    def fell_back(self, decision: Decision, skipped: str, to: str, why: str) -> Decision:
        self.state.metrics.route_fallbacks.labels(decision.policy, skipped, to, why).inc()
        log.info("route %s: %s skipped (%s), trying %s", decision.policy, skipped, why, to)
        return Decision(decision.policy, to, f"fallback from {skipped} ({why}) after {decision.reason}", "fallback")

    async def run_first(self, decision: Decision, order: list[str], body, run: Run,
                        spent_before: list[tuple[str, int]] = ()):
        """Answer from the first target in `order` that is available; a refused upstream is skipped too.
        `spent_before`: (target, tokens) already generated for this request (an escalated student's)."""
        sent = self.book.request_body(decision.policy, body)
        last_error: Exception | None = None
        why: str | None = None  # why the previous target was skipped
        for i, name in enumerate(order):
            if i > 0:
                decision = self.fell_back(decision, order[i - 1], name, why)
            why = self.unavailable(name)
            if why is not None and i < len(order) - 1:
                continue
            try:
                answer = await run(name, sent)
                self.record(decision)
                self.book.settle(decision, answer, body, spent_before)
                answer.headers.update(decision.header())
                return answer
            except UpstreamUnavailable as exc:
                why, last_error = "unreachable", exc
        raise last_error or Overloaded("no routing target is available")

    # ---- request facts -------------------------------------------------------------------------
    async def facts(self, call, likely_target: str) -> rules.RequestFacts:
        kind, body = call.kind, call.body
        return rules.RequestFacts(prompt_tokens=await self.count_prompt_tokens(kind, body, likely_target),
                                  max_tokens=body.requested_max_tokens(), text=last_user_text(kind, body),
                                  headers=call.headers)

    async def count_prompt_tokens(self, kind: str, body, likely_target: str) -> int:
        """With the tokenizer of the policy's default target when it has one, else of the first model that
        has one; with only remote models, about 4 characters a token."""
        engines = [self.state.engines[likely_target], *self.state.engines.values()]
        local = next((e for e in engines if e.capabilities.tokenizer), None)
        if local is None:
            return len(last_user_text(kind, body)) // 4
        if kind == "chat":
            messages = body.template_messages()
            ids = await asyncio.to_thread(local.render_chat, messages, body.add_generation_prompt)
            return len(ids)
        prompts = body.prompts()
        return max(len(p) if isinstance(p, list) else len(await asyncio.to_thread(local.encode, p)) for p in prompts)


def last_user_text(kind: str, body) -> str:
    if kind == "chat":
        users = [m for m in body.messages if m.role == "user"]
        return (users[-1] if users else body.messages[-1]).text()
    prompts = body.prompts()
    first = prompts[0] if prompts else ""
    return first if isinstance(first, str) else ""
