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
    """Rows that may take drafts: any that will make two tokens or more. The check keeps a drafted token
    only where the row's own pick at that position (argmax, or a sample with its penalties, temperature,
    top-k/p, generator and grammar: a constrained row's matcher has accepted the tokens before, so its
    mask is the one a plain step would use) equals it, and stops at the first pick that differs, which is
    emitted; tokens after it never reach the matcher. Every token is
    still drawn from the model's distribution given the tokens before it, one draw per emitted token, so a
    seeded row draws the same random numbers as without speculation, and its output is the same wherever
    the check's logits equal a plain step's (fp32; in bf16 a near tie can flip, as for greedy rows). A
    sampled row's draft token is accepted with the model's probability of it: what rejection sampling
    accepts for a draft that is one token for sure."""
    return params.max_tokens > 1


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
    chance: "AcceptanceChance" = field(default_factory=lambda: AcceptanceChance(0.6))

    @property
    def p(self) -> float:
        """Estimated chance that the model accepts the next draft token."""
        return self.chance.p

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
        self.chance.observe(proposed, accepted)
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


@dataclass
class AcceptanceChance:
    """A row's chance that the model accepts its next draft token: accepted over tested tokens (the
    accepted ones and the first rejected), exponentially weighted, starting from `prior` (one try's worth)."""

    prior: float
    _hits: float = 0.0
    _tries: float = 0.0

    @property
    def p(self) -> float:
        return (self._hits + self.prior) / (self._tries + 1.0)

    def observe(self, proposed: int, accepted: int) -> None:
        if proposed:
            self._hits = 0.8 * self._hits + accepted
            self._tries = 0.8 * self._tries + accepted + (accepted < proposed)

    def forget(self, keep: float = 0.9) -> None:
        """A step without a draft: the estimate drifts back toward the prior, so a row whose drafts failed
        a while ago is tried again (~15 steps after one failure) instead of never again."""
        self._hits *= keep
        self._tries *= keep


class _Sums:
    """Exponentially weighted sums over one kind of step: weight, tokens, seconds, tokens^2, tokens*seconds."""

    def __init__(self):
        self.w = self.n = self.t = self.nn = self.nt = 0.0

    def decay(self, d: float) -> None:
        self.w, self.n, self.t, self.nn, self.nt = (d * x for x in (self.w, self.n, self.t, self.nn, self.nt))

    def add(self, tokens: float, seconds: float) -> None:
        self.w += 1
        self.n += tokens
        self.t += seconds
        self.nn += tokens * tokens
        self.nt += tokens * seconds

    def plus(self, other: "_Sums") -> "_Sums":
        both = _Sums()
        both.w, both.n, both.t, both.nn, both.nt = (x + y for x, y in zip(
            (self.w, self.n, self.t, self.nn, self.nt), (other.w, other.n, other.t, other.nn, other.nt)))
        return both

    def line(self, min_weight: float) -> tuple[float, float] | None:
        """(intercept, slope) of seconds against tokens, or None while the steps have not varied enough."""
        var = self.w * self.nn - self.n * self.n
        if self.w < min_weight or var <= (0.5 * self.w) ** 2:
            return None
        slope = (self.w * self.nt - self.n * self.t) / var
        return (self.t - slope * self.n) / self.w, slope


class StepCost:
    """Seconds per decode step as a + b * tokens + c * (a draft check), fitted online (exponentially
    weighted) from the engine's own steps, timed whole (forward, sampling, acceptance): a draft check
    also pays its per-position sampling and acceptance loop and its cache bookkeeping (~2 ms a step on
    SmolLM2 at 16 rows, measured), which no count of tokens explains. b comes from the draft checks' own
    spread of sizes, a from plain steps given b, and c is what draft checks cost beyond both; while the
    draft checks have not varied enough, one line through all steps gives a and b and c is the prior
    (a nearly collinear three-way fit swung b by 3x, and below 0, on one-row timings)."""

    def __init__(self, prior_ratio: float = 1 / 32, prior_overhead: float = 0.15, decay: float = 0.98):
        self.prior_ratio = prior_ratio  # b / a before any fit: 32 tokens in a forward cost twice one
        self.prior_overhead = prior_overhead  # c / a before any fit
        self.decay = decay
        self._plain, self._draft = _Sums(), _Sums()

    def observe(self, tokens: int, seconds: float, draft: bool = False) -> None:
        for sums in (self._plain, self._draft):
            sums.decay(self.decay)
        (self._draft if draft else self._plain).add(float(tokens), seconds)

    def _fit(self) -> tuple[float, float, float] | None:
        """(a, b, c), or None while the steps have not varied enough."""
        plain, draft = self._plain, self._draft
        checks = draft.line(min_weight=3)
        if checks is not None and plain.w >= 2:
            b = max(0.0, checks[1])
            a = (plain.t - b * plain.n) / plain.w
            return a, b, (draft.t - b * draft.n) / draft.w - a
        line = plain.plus(draft).line(min_weight=4)
        if line is None:
            return None
        a, b = line[0], max(0.0, line[1])
        if plain.w < 2:  # draft checks only: their fixed part is a + c
            return a / (1 + self.prior_overhead), b, a * self.prior_overhead / (1 + self.prior_overhead)
        return a, b, a * self.prior_overhead

    def shares(self) -> tuple[float, float]:
        """(b / a, c / a): one more token in a forward, and a draft check's own cost, each relative to a
        step's fixed cost."""
        fit = self._fit()
        if fit is None:
            return self.prior_ratio, self.prior_overhead
        a, b, c = fit
        if a <= 0:
            return 1.0, self.prior_overhead
        return b / a, max(0.0, c / a)


def choose_width(drafts: list[list[int]], chances: list[float], ratio: float, overhead: float = 0.0) -> int:
    """The number of draft tokens per row (0..longest) that maximises expected tokens per unit of step
    cost, 1 + ratio * rows * (1 + width) (+ overhead for a draft check); each row's draft token j is
    accepted with chance p^j."""
    rows = len(drafts)
    longest = max(len(d) for d in drafts)
    best, best_rate = 0, rows / (1 + ratio * rows)
    expected = float(rows)
    for width in range(1, longest + 1):
        expected += sum(p ** width for d, p in zip(drafts, chances) if len(d) >= width)
        rate = expected / (1 + overhead + ratio * rows * (1 + width))
        if rate > best_rate:
            best, best_rate = width, rate
    return best


def choose_widths(drafts: list[list[int]], chances: list[float], ratio: float, overhead: float = 0.0) -> list[int]:
    """Each row's number of draft tokens when a step costs 1 + ratio * (tokens fed) (+ overhead for a
    draft check) and each row is fed only its own: the draft tokens are taken in order of their chance of
    being accepted (row i's token j: p_i^j, falling with j, so each row keeps a prefix), as many as
    maximise expected tokens per cost."""
    rows = len(drafts)
    gains = sorted(((p ** j, j, i) for i, (d, p) in enumerate(zip(drafts, chances)) for j in range(1, len(d) + 1)),
                   key=lambda g: (-g[0], g[1]))
    expected, best, best_rate = float(rows), 0, rows / (1 + ratio * rows)
    for n, (gain, _, _) in enumerate(gains, start=1):
        expected += gain
        rate = expected / (1 + overhead + ratio * (rows + n))
        if rate > best_rate:
            best, best_rate = n, rate
    widths = [0] * rows
    for _, j, i in gains[:best]:
        widths[i] = max(widths[i], j)
    return widths
