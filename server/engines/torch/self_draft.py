"""Self-speculation (speculative_config method `quantized_self`): a copy of the served model with its
linears quantized to int4 or int8 proposes the next tokens of the greedy rows, and the served model
checks them in one draft check (the same check prompt lookup uses), so the output stays the model's own.

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

import torch
from torch import nn

from server.engines.speculation_config import QuantizedSelfConfig

log = logging.getLogger(__name__)

PRIOR_CHANCE = 0.9  # a new row's chance that the model accepts a draft token (measured: 0.97-0.98)
_PRIOR_SHARE = {"int4": 0.6, "int8": 0.7}  # a draft step over a plain step of as many rows, until measured
_EMA = 0.2
_REFRESH = 64  # steps of a batch size after which the unused path is timed once more


def build_draft_model(model: nn.Module, quantization: str) -> nn.Module:
    """The served model's copy with every linear on slimserve's int4/int8 kernels (quantize_linears.py);
    the token embedding is shared with the model, not copied."""
    from server.engines.torch.quantize_linears import quantize_linears

    draft = copy.deepcopy(model)
    report = quantize_linears(draft, quantization)
    draft.set_input_embeddings(model.get_input_embeddings())
    log.info("self-speculation draft: the model's %s copy (%s)", quantization, report["kernel"])
    return draft.eval()


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
        before = getattr(self, kind)
        setattr(self, kind, seconds if before is None else (1 - _EMA) * before + _EMA * seconds)
        setattr(self, f"{kind}_at", step)


class SelfDraft:
    def __init__(self, model: nn.Module, config: QuantizedSelfConfig):
        self.model = model  # the quantized copy
        self.config = config
        self.compiled = None  # compiled_decode.CompiledDecode of the copy, set once it has compiled
        self._timings: dict[int, _Timing] = {}
        self._steps = 0  # decode steps seen (the clock the refresh counts on)
        self.draft_steps = 0  # the copy's forward steps run (a test reads it)

    @property
    def max_tokens(self) -> int:
        return self.config.num_speculative_tokens

    # ---- the draft itself -----------------------------------------------------------------------
    def step(self, runner, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Next-token logits [rows, vocab] of the copy over runner's cache and mask (its new column already
        in the mask); writes the copy's keys and values at the cache's next column."""
        self.draft_steps += 1
        if self.compiled is not None and self.compiled.usable:
            logits = self.compiled.step(runner, ids, positions)
            if logits is not None:
                return logits[:, -1, :]
        out = self.model(input_ids=ids, attention_mask=runner.mask, position_ids=positions,
                         past_key_values=runner.cache, use_cache=True)
        return out.logits[:, -1, :]

    # ---- how many tokens to draft ---------------------------------------------------------------
    def choose(self, chances: list[float | None], ratio: float, overhead: float) -> int:
        """Tokens to draft this step (0: a plain step), for rows whose chances of acceptance are these
        (None: a row that takes no draft). Maximises expected tokens per second: a draft of k costs k draft
        steps plus a draft check of rows + k * (drafting rows) tokens, in units of a plain step of as many
        rows (`ratio`, `overhead`: StepCost.shares, relative to a step's fixed cost)."""
        self._steps += 1
        rows = len(chances)
        timing = self._timings.setdefault(bucket(rows), _Timing())
        if timing.plain is None or self._steps - timing.plain_at > _REFRESH and timing.draft_at > timing.plain_at:
            return 0  # time a plain step at this size first, and again now and then
        share = _PRIOR_SHARE[self.config.quantization] if timing.draft is None else timing.draft / timing.plain
        if timing.draft is not None and self._steps - timing.draft_at > _REFRESH:
            share = min(share, _PRIOR_SHARE[self.config.quantization])  # stale: try drafting again
        return best_draft_length(chances, self.max_tokens, share, ratio, overhead)

    def observe(self, rows: int, seconds: float, drafted: int = 0) -> None:
        """A plain step (drafted 0) or a draft of `drafted` tokens took `seconds` for `rows` rows."""
        timing = self._timings.setdefault(bucket(rows), _Timing())
        if drafted:
            timing.add("draft", seconds / drafted, self._steps)
        else:
            timing.add("plain", seconds, self._steps)


def best_draft_length(chances: list[float | None], most: int, share: float, ratio: float, overhead: float) -> int:
    """The draft length k (0..most) with the most expected tokens per unit of time, where a plain step of
    the batch costs 1, a draft step `share`, and a draft check (1 + overhead + ratio * tokens fed) / (1 +
    ratio * rows). Row i accepts k drafted tokens' prefix with chance p_i per token: it yields
    (1 - p^(k+1)) / (1 - p) tokens; a row without a draft yields 1."""
    rows = len(chances)
    drafting = [min(p, 0.999) for p in chances if p is not None]
    if not drafting:
        return 0
    plain = 1 + ratio * rows
    best, best_rate = 0, float(rows)
    for k in range(1, most + 1):
        tokens = rows - len(drafting) + sum((1 - p ** (k + 1)) / (1 - p) for p in drafting)
        cost = k * share + (1 + overhead + ratio * (rows + k * len(drafting))) / plain
        if tokens / cost > best_rate:
            best, best_rate = k, tokens / cost
    return best

