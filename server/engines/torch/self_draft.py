"""Self-speculation (speculative_config method `quantized_self`): a copy of the served model with its
linears quantized to int4 or int8 proposes each row's next tokens (its greedy ones), and the served model
checks them in the draft check prompt lookup uses (for the rows prompt_lookup.eligible names): the output
stays the model's own, greedy, sampled or grammar-constrained.

Why this draft: a separately trained student agreed with SmolLM2 too rarely to pay (#20), while the
model's own quantized copy picks the same greedy token on 98% (int4) / 97% (int8) of positions
(teacher-forced, bf16) and decodes 1.5-1.6x faster at batch 1 (docs/performance.md).

The draft needs no cache of its own: its steps read the served model's keys and values of every
accepted position and write their own at the columns the draft check then overwrites, so the scheduler
rolls the cache back after drafting (`ModelRunner.look_ahead`). Every step decides how many tokens to
draft, 0 included, from measured costs: a draft step's seconds against a plain step's at that batch
size (both timed here, per size bucket) and each row's acceptance; at 16 rows on 2 cores a draft step
costs about what a plain step does, so drafting stops there by itself.
"""

from __future__ import annotations

import copy
import logging

from torch import nn

from server.engines.speculation_config import NgramConfig, QuantizedSelfConfig
from server.errors import ConfigError

log = logging.getLogger(__name__)

PRIOR_CHANCE = 0.9  # a new row's chance that the model accepts a draft token (measured: 0.97-0.98)
_PRIOR_SHARE = {"int4": 0.6, "int8": 0.7}  # a draft step over a plain step of as many rows, until measured
_EMA = 0.2
_REFRESH = 64  # steps of a batch size after which the unused path is timed once more
_MAX_FAILURES = 3


def build_draft_model(model: nn.Module, quantization: str) -> nn.Module:
    """The served model's copy with every linear on slimserve's int4/int8 kernels (quantize_linears.py);
    everything else (embedding, norms) shares the model's tensors, so loading never holds two full copies."""
    from server.engines.torch.quantize_linears import quantize_linears

    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}  # copy the modules, not the tensors
    draft = copy.deepcopy(model, memo=shared)
    report = quantize_linears(draft, quantization)  # swaps the copy's linears for new modules
    log.info("self-speculation draft: the model's %s copy (%s)", quantization, report["kernel"])
    return draft.eval()


def _own_bytes(draft: nn.Module, model: nn.Module) -> int:
    """Bytes of the copy's weights that the model does not hold too (what drafting adds to memory)."""
    from compress.load_time import weight_bytes

    ours = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    shared = {t.untyped_storage().data_ptr(): t.nbytes for t in (*draft.parameters(), *draft.buffers())
              if t.untyped_storage().data_ptr() in ours}
    return weight_bytes(draft) - sum(shared.values())


def bucket(rows: int) -> int:
    """Batch sizes timed together: 1, 2, 3-4, 5-8, 9-16, ..."""
    return (rows - 1).bit_length()


class _Timing:
    """One batch-size bucket: seconds of a plain step and of a draft step (EMA), and when each was last timed."""

    def __init__(self):
        self.plain: float | None = None
        self.draft: float | None = None
        self.plain_at = self.draft_at = -1

    def add(self, kind: str, seconds: float, step: int) -> None:
        """A fresh figure replaces one timed over _REFRESH steps ago (else one outlier, blended in only at
        each refresh, would steer the choice for hundreds of steps); a recent one is averaged in."""
        before, at = getattr(self, kind), getattr(self, f"{kind}_at")
        fresh = before is None or step - at > _REFRESH
        setattr(self, kind, seconds if fresh else (1 - _EMA) * before + _EMA * seconds)
        setattr(self, f"{kind}_at", step)


class SelfDraft:
    def __init__(self, model: nn.Module, config: QuantizedSelfConfig, extra_bytes: int = 0):
        self.model = model  # the quantized copy
        self.config = config
        self.extra_bytes = extra_bytes  # what the copy adds to the model's memory
        self.compiled = None  # compiled_decode.CompiledDecode of the copy, set once it has compiled
        self._timings: dict[int, _Timing] = {}
        self._steps = 0  # decode steps seen (the clock the refresh counts on)
        self.draft_steps = 0  # the copy's forward steps run (a test reads it)
        self.failures = 0  # drafts that raised; at _MAX_FAILURES drafting stops (`usable`)
        self.last_error = ""

    @classmethod
    def for_model(cls, model: nn.Module, config: QuantizedSelfConfig, lookup: NgramConfig | None,
                  quantized: str | None, device) -> "SelfDraft":
        """The draft of speculative_config method quantized_self for this loaded model; refused (ConfigError,
        naming why) where it cannot help or run. `lookup`: prompt lookup configured beside it, which must be
        its own; `quantized`: the model's quantization, if any."""
        setting = "speculative_config.method"
        if lookup is not None and lookup != config.lookup:
            raise ConfigError(setting, "prompt lookup runs beside quantized_self only as its `lookup` (the "
                                       "prompt_lookup_max/min keys of the quantized_self method)")
        if quantized:
            raise ConfigError(setting, f"the model is served quantized ({quantized}); a quantized copy drafts for "
                                       "a full-precision model (serve it without quantization)")
        if device.type != "cpu":
            raise ConfigError(setting, "quantized_self runs on a CPU (the draft uses torch's CPU int4/int8 kernels)")
        copy = build_draft_model(model, config.quantization)
        return cls(copy, config, _own_bytes(copy, model))

    @property
    def usable(self) -> bool:
        return self.failures < _MAX_FAILURES

    def failed(self, exc: Exception) -> None:
        """A draft raised (the runner has rolled the cache back): the step goes on without it."""
        self.failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        log.warning("self-speculation draft failed (%d of %d before it stops): %s", self.failures, _MAX_FAILURES,
                    self.last_error.splitlines()[0] if self.last_error else "")

    @property
    def max_tokens(self) -> int:
        return self.config.num_speculative_tokens

    def describe(self) -> str:
        """For /v1/models: what drafts, its memory, how its step runs."""
        step = "stopped after failing" if not self.usable else "compiled" if (
            self.compiled is not None and self.compiled.usable) else "eager"
        return (f"quantized_self: the model's {self.config.quantization} copy drafts up to {self.max_tokens} tokens "
                f"a step ({self.extra_bytes / 1e6:.0f} MB more, its decode step {step})")

    # ---- how many tokens to draft ---------------------------------------------------------------
    def wants_plain(self, rows: int) -> bool:
        """Whether this step, of `rows` rows, should be a plain step with no drafts of any kind (prompt
        lookup's included), to time one: the first at each batch size, and one every _REFRESH steps while
        drafting. Called once a decode step (the clock the refresh counts on)."""
        self._steps += 1
        timing = self._timings.setdefault(bucket(rows), _Timing())
        return timing.plain is None or self._steps - timing.plain_at > _REFRESH and timing.draft_at > timing.plain_at

    def choose(self, chances: list[float | None], ratio: float, overhead: float, packed: bool = True,
               most: int | None = None, others: list[tuple[float, int]] = ()) -> int:
        """Tokens to draft this step (0: none), at most `most`, for rows whose chances of acceptance are these
        (None: a row that takes no draft of the copy's); `others`: (chance, length) of the drafts the step
        checks anyway (prompt lookup's). Maximises expected tokens per second: a draft of k costs k draft
        steps plus its tokens in the draft check (best_draft_length), in units of a plain step of as many
        rows (`ratio`, `overhead`: StepCost.shares, relative to a step's fixed cost)."""
        timing = self._timings.setdefault(bucket(len(chances)), _Timing())
        if timing.plain is None:
            return 0
        share = _PRIOR_SHARE[self.config.quantization] if timing.draft is None else timing.draft / timing.plain
        if timing.draft is not None and self._steps - timing.draft_at > _REFRESH:
            share = min(share, _PRIOR_SHARE[self.config.quantization])  # stale: try drafting again
        most = self.max_tokens if most is None else min(most, self.max_tokens)
        return best_draft_length(chances, most, share, ratio, overhead, packed, others)

    def observe(self, rows: int, seconds: float, drafted: int = 0) -> None:
        """A plain step (drafted 0) or a draft of `drafted` tokens took `seconds` for `rows` rows."""
        timing = self._timings.setdefault(bucket(rows), _Timing())
        if drafted:
            timing.add("draft", seconds / drafted, self._steps)
        else:
            timing.add("plain", seconds, self._steps)


def best_draft_length(chances: list[float | None], most: int, share: float, ratio: float, overhead: float,
                      packed: bool = True, others: list[tuple[float, int]] = ()) -> int:
    """The draft length k (0..most) with the most expected tokens per unit of time, where a plain step of
    the batch costs 1, a draft step `share`, and a draft check (1 + overhead + ratio * tokens fed) / (1 +
    ratio * rows); it feeds each row its own tokens when `packed` (the compiled check), else every row as
    many as the widest (one dense forward). A draft of length d accepted token by token with chance p
    yields (1 - p^(d+1)) / (1 - p) tokens; a row without a draft yields 1. `others`: (p, d) of drafts
    the step checks whatever k is (prompt lookup's), so k = 0 is a plain step only without them."""
    rows = len(chances)
    drafting = [p for p in chances if p is not None]
    if not drafting:
        return 0
    plain = 1 + ratio * rows

    def expected(p: float, d: int) -> float:
        p = min(p, 0.999)
        return (1 - p ** (d + 1)) / (1 - p)

    def rate(k: int) -> float:
        tokens = rows - len(drafting) - len(others) + sum(expected(p, d) for p, d in others) + \
            sum(expected(p, k) for p in drafting)
        widest = max([k, *(d for _, d in others)])
        if widest == 0:
            return tokens
        fed = rows + k * len(drafting) + sum(d for _, d in others) if packed else rows * (1 + widest)
        return tokens / (k * share + (1 + overhead + ratio * fed) / plain)

    return max(range(most + 1), key=lambda k: (rate(k), -k))
