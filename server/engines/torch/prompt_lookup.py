"""Prompt-lookup speculation (n-gram drafts, no draft model): what each row proposes and how much.

A row's draft is the tokens that followed the latest earlier occurrence of its last n tokens in its
own prompt and output (n from prompt_lookup_max down to prompt_lookup_min). The model checks the
draft in the next decode step (scheduler.py); the row keeps the longest prefix the model itself would
have produced, plus the model's own next token, so greedy output is unchanged.

How many tokens a row proposes follows its measured acceptance: all accepted -> one more (up to
num_speculative_tokens), some rejected -> as many as were accepted plus one. A row whose acceptance
stays low stops proposing, and retries after a cool-down that doubles each time it fails again, so
speculation costs next to nothing where the text does not repeat. `StepCost` times the engine's
forwards. Where the draft check is one dense forward (eager), every row pays for the widest draft and
`choose_width` cuts the drafts to the one width with the most expected tokens per second; where it
feeds each row only its own tokens (the compiled step), `choose_widths` cuts each row's draft on its
own. Pure Python, no torch.
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
    p: float = 0.6  # estimated chance that the model accepts the next draft token
    _hits: float = 0.0
    _tries: float = 0.0

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
        self._hits = 0.8 * self._hits + accepted  # tokens tested: the accepted ones and the first rejected
        self._tries = 0.8 * self._tries + accepted + (accepted < proposed)
        self.p = (self._hits + 0.6) / (self._tries + 1.0)
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


class StepCost:
    """Seconds per forward as a + b * tokens, fitted online (exponentially weighted least squares) from
    the engine's own decode and draft steps; a prior holds until the steps have varied enough."""

    def __init__(self, prior_ratio: float = 1 / 32, decay: float = 0.98):
        self.prior_ratio = prior_ratio  # b / a before any fit: 32 tokens in a forward cost twice one
        self.decay = decay
        self._s = [0.0] * 5  # weights, sum n, sum t, sum n*n, sum n*t

    def observe(self, tokens: int, seconds: float) -> None:
        d = self.decay
        w, sn, st, snn, snt = (x * d for x in self._s)
        self._s = [w + 1, sn + tokens, st + seconds, snn + tokens * tokens, snt + tokens * seconds]

    def ratio(self) -> float:
        """b / a: the cost of one more token in a forward, relative to a forward's fixed cost."""
        w, sn, st, snn, snt = self._s
        var = w * snn - sn * sn
        if w < 4 or var <= (0.5 * w) ** 2:  # too few steps, or too little spread in their sizes
            return self.prior_ratio
        b = (w * snt - sn * st) / var
        a = (st - b * sn) / w
        if b <= 0:
            return 0.0
        if a <= 0:
            return 1.0
        return b / a


def choose_width(drafts: list[list[int]], chances: list[float], ratio: float) -> int:
    """The number of draft tokens per row (0..longest) that maximises expected tokens per unit of
    forward cost, 1 + ratio * rows * (1 + width); each row's draft token j is accepted with chance p^j."""
    rows = len(drafts)
    longest = max(len(d) for d in drafts)
    best, best_rate = 0, rows / (1 + ratio * rows)
    expected = float(rows)
    for width in range(1, longest + 1):
        expected += sum(p ** width for d, p in zip(drafts, chances) if len(d) >= width)
        rate = expected / (1 + ratio * rows * (1 + width))
        if rate > best_rate:
            best, best_rate = width, rate
    return best


def choose_widths(drafts: list[list[int]], chances: list[float], ratio: float) -> list[int]:
    """Each row's number of draft tokens when a forward costs 1 + ratio * (tokens fed) and each row is fed
    only its own: the draft tokens are taken in order of their chance of being accepted (row i's token j:
    p_i^j, falling with j, so each row keeps a prefix), as many as maximise expected tokens per cost."""
    rows = len(drafts)
    gains = sorted(((p ** j, j, i) for i, (d, p) in enumerate(zip(drafts, chances)) for j in range(1, len(d) + 1)),
                   key=lambda g: (-g[0], g[1]))
    expected, best, best_rate = float(rows), 0, rows / (1 + ratio * rows)
    for n, (gain, _, _) in enumerate(gains, start=1):
        expected += gain
        rate = expected / (1 + ratio * (rows + n))
        if rate > best_rate:
            best, best_rate = n, rate
    widths = [0] * rows
    for _, j, i in gains[:best]:
        widths[i] = max(widths[i], j)
    return widths
