"""Whether a lone greedy request should go through the draft model (speculative.py) or decode plainly.

A draft pays only when it is cheap against the model and agrees with it often: measured on SmolLM2,
pruned students as drafts ran at 0.66-0.78x of the model alone (docs/routing.md). So the engine
measures both paths on its own requests (seconds per decoded token after the first chunk, requests that
ran alone) and sends the next one where it decodes faster: the draft first, `_SAMPLES` times, then the
plain path as many, then the faster by its recent average. Now and then the other path runs once to be
re-measured, so a change (another load, longer answers) is noticed: after `_PROBE` decisions, and each
probe that finds the same path faster doubles the wait (up to `_MAX_PROBE`), so a draft that never pays
costs next to nothing in the long run. Pure Python, no torch.
"""

from __future__ import annotations

_SAMPLES = 3  # measured requests per path before judging
_TRIES = 2 * _SAMPLES  # requests per path after which warm-up moves on even if few could be measured
_PROBE = 16  # decisions before the path not chosen runs once to be re-measured (doubling while it loses)
_MAX_PROBE = 512
_EMA = 0.3  # weight of the newest measurement
MIN_TOKENS = 8  # a shorter answer says too little about decode speed


class SpeculationJudge:
    def __init__(self):
        self.seconds_per_token = {"draft": None, "plain": None}
        self.samples = {"draft": 0, "plain": 0}
        self.tries = {"draft": 0, "plain": 0}
        self.decisions = 0
        self.probes = 0
        self._interval = _PROBE
        self._since_probe = 0
        self._probing: str | None = None  # the path a probe sent the last request to

    def choose(self) -> str:
        """"draft" or "plain" for the next lone greedy request."""
        self.decisions += 1
        for path in ("draft", "plain"):  # warm-up; short or aborted answers measure nothing, so it is bounded
            if self.samples[path] < _SAMPLES and self.tries[path] < _TRIES:
                self.tries[path] += 1
                return path
        measured = {p: s for p, s in self.seconds_per_token.items() if s is not None}
        if len(measured) < 2:  # one path never measured: keep to the plain path, unless only the draft was
            return "plain" if "plain" in measured or not measured else "draft"
        faster = min(measured, key=measured.get)
        self._since_probe += 1
        if self._since_probe >= self._interval:
            self._since_probe = 0
            self.probes += 1
            self._probing = "plain" if faster == "draft" else "draft"
            return self._probing
        return faster

    def observe(self, path: str, tokens: int, seconds: float) -> None:
        """A request of `path` decoded `tokens` tokens (after its first chunk) in `seconds`."""
        if tokens < MIN_TOKENS or seconds <= 0:
            return
        now = seconds / tokens
        before = self.seconds_per_token[path]
        self.samples[path] += 1
        if path == self._probing:  # a probe: its fresh figure replaces an average that may be old
            self._probing = None
            self.seconds_per_token[path] = now
            slower = now > min(v for v in self.seconds_per_token.values() if v is not None)
            self._interval = min(2 * self._interval, _MAX_PROBE) if slower else _PROBE  # still slower: wait longer
            return
        self.seconds_per_token[path] = now if before is None else (1 - _EMA) * before + _EMA * now

    def speedup(self) -> float | None:
        """Plain seconds per token over the draft's: > 1 when the draft pays (None until both are measured)."""
        draft, plain = self.seconds_per_token["draft"], self.seconds_per_token["plain"]
        return plain / draft if draft and plain else None
