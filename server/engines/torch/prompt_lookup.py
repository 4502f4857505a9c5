"""Prompt-lookup speculation (n-gram drafts, no draft model): what each row proposes and how much.

A row's draft is the tokens that followed the latest earlier occurrence of its last n tokens in its
own prompt and output (n from prompt_lookup_max down to prompt_lookup_min). The model checks the
draft in the next decode step (scheduler.py); the row keeps the longest prefix the model itself would
have produced, plus the model's own next token, so greedy output is unchanged.

How many tokens a row proposes follows its measured acceptance: all accepted -> one more (up to
num_speculative_tokens), some rejected -> as many as were accepted plus one. A row whose acceptance
stays low stops proposing, and retries after a cool-down that doubles each time it fails again, so
speculation costs next to nothing where the text does not repeat. Pure Python, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from server.engines.base import SamplingParams
from server.engines.speculation_config import NgramConfig

_EMA = 0.3  # weight of the latest step in a row's acceptance rate
_LOW = 0.25  # acceptance rate under which a row stops proposing
_COOLDOWN = 16  # decode steps a stopped row waits before it tries again (doubled at each failure)
_MIN_TRIALS = 3  # drafts a row is judged on before it may be stopped


def eligible(params: SamplingParams, adapter: str | None = None) -> bool:
    """Rows whose output prompt lookup reproduces exactly: greedy, not grammar-constrained. Sampled rows
    are never speculated on (no rejection sampling here): they decode one token a step as before."""
    return params.greedy and params.guide is None and params.max_tokens > 1


class NgramIndex:
    """Where each n-gram of a token list last ended, updated as the list grows."""

    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n
        self._last: dict[tuple[int, ...], int] = {}
        self._indexed = 0  # n-grams ending before this position are in _last

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest matching suffix."""
        end = len(tokens)
        for stop in range(self._indexed + 1, end):  # index n-grams ending at 1..end-1 (not the suffix itself)
            for n in range(self.min_n, min(self.max_n, stop) + 1):
                self._last[tuple(tokens[stop - n:stop])] = stop
        self._indexed = max(self._indexed, end - 1)
        for n in range(min(self.max_n, end - 1), self.min_n - 1, -1):
            at = self._last.get(tuple(tokens[end - n:]))
            if at is not None:
                return tokens[at:at + k]
        return []


@dataclass
class RowDraft:
    """One row's prompt-lookup state: its n-gram index and its adaptive draft length."""

    config: NgramConfig
    index: NgramIndex = field(init=False)
    k: int = field(init=False)
    rate: float = 1.0  # acceptance rate (EMA over drafts)
    trials: int = 0
    cooldown: int = 0  # steps left before proposing again
    backoff: int = _COOLDOWN
    proposed: int = 0
    accepted: int = 0

    def __post_init__(self) -> None:
        self.index = NgramIndex(self.config.prompt_lookup_min, self.config.prompt_lookup_max)
        self.k = max(1, self.config.num_speculative_tokens // 2)

    def propose(self, tokens: list[int], room: int) -> list[int]:
        """This step's draft (maybe empty); `room` caps it (tokens the row may still produce, minus one)."""
        if self.cooldown > 0:
            self.cooldown -= 1
            if self.cooldown > 0:
                return []
            self.rate, self.trials, self.k = 0.5, 0, 1  # try again, carefully
        k = min(self.k, room)
        return self.index.propose(tokens, k) if k > 0 else []

    def observe(self, proposed: int, accepted: int) -> None:
        """The outcome of one verified draft."""
        if proposed == 0:
            return
        self.proposed += proposed
        self.accepted += accepted
        self.trials += 1
        self.rate = (1 - _EMA) * self.rate + _EMA * (accepted / proposed)
        if accepted == proposed:
            self.k = min(self.config.num_speculative_tokens, self.k + 1)
        else:
            self.k = max(1, accepted + 1)
        if self.trials >= _MIN_TRIALS and self.rate < _LOW:
            self.cooldown = self.backoff
            self.backoff = min(self.backoff * 2, 1024)
        elif accepted:
            self.backoff = _COOLDOWN
