"""The `rules` policy: the first rule whose every condition holds picks the target."""

from __future__ import annotations

import re
from dataclasses import dataclass

from server.model_config import Rule, RulesPolicy


@dataclass
class RequestFacts:
    """What rules look at, gathered once per request."""

    prompt_tokens: int
    max_tokens: int | None
    text: str  # the last user message, or the prompt
    headers: dict[str, str]


def matches(rule: Rule, facts: RequestFacts) -> bool:
    if rule.prompt_tokens_over is not None and not facts.prompt_tokens > rule.prompt_tokens_over:
        return False
    if rule.prompt_tokens_under is not None and not facts.prompt_tokens < rule.prompt_tokens_under:
        return False
    if rule.max_tokens_over is not None and not (facts.max_tokens or 0) > rule.max_tokens_over:
        return False
    if rule.max_tokens_under is not None and not (facts.max_tokens is not None
                                                  and facts.max_tokens < rule.max_tokens_under):
        return False
    if rule.regex is not None and not re.search(rule.regex, facts.text):
        return False
    if rule.header is not None:
        value = facts.headers.get(rule.header.lower())
        if value is None or (rule.header_value is not None and not re.fullmatch(rule.header_value, value)):
            return False
    return True


def decide(policy: RulesPolicy, facts: RequestFacts) -> tuple[str, str]:
    """(target, reason)."""
    for i, rule in enumerate(policy.rules):
        if matches(rule, facts):
            return rule.target, f"rule {i}"
    return policy.default, "default"
