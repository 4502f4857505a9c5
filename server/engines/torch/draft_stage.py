"""The speculation half of a decode step of the batch scheduler (scheduler.py): each row's draft
(prompt lookup: prompt_lookup.py; the model's quantized copy: self_draft.py), trimmed to the widths
the measured step costs say pay, then one step that checks every draft and accepts, per row, the
tokens the model agrees with; the timing of plain steps those choices learn from; and what drafts, as
/v1/models says it.

A mixin of BatchScheduler: it works on the scheduler's runner, rows, lookup, self_draft and step_cost,
and hands tokens to its acceptance (`_pick`, `_accept`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from server.engines.torch.prompt_lookup import choose_width, choose_widths

if TYPE_CHECKING:
    from server.engines.torch.scheduler import Sequence

log = logging.getLogger("server.engines.torch.scheduler")  # one logger name for the engine loop's messages


class DraftStage:
    def _drafts(self, rows: list[Sequence], own_draft: bool) -> tuple[list[list[int]], list, float]:
        """Each row's draft ([] for none), whose acceptance each tells (`judges`: the row's RowDraft or
        AcceptanceChance), and the seconds the quantized copy spent drafting (kept apart from the check's
        time). `own_draft`: the copy may draft this step."""
        timing_plain = own_draft and self.self_draft.wants_plain(len(rows))  # no drafts of any kind this step
        drafts = [self._propose(s) for s in rows] if self.lookup is not None and not timing_plain else \
            [[] for _ in rows]
        judges = [s.draft if d else None for s, d in zip(rows, drafts)]
        drafting = 0.0
        if own_draft and not timing_plain:
            started = time.perf_counter()
            own = self._look_ahead(rows, drafts, judges)  # for the rows prompt lookup found nothing for
            drafting = time.perf_counter() - started
            drafts = [d or o for d, o in zip(drafts, own)]
            judges = [j or (s.chance if o else None) for j, s, o in zip(judges, rows, own)]
        if any(drafts):
            chances = [j.p if j else 0.0 for j in judges]
            ratio, overhead = self.step_cost.shares()
            if self.runner.packs_drafts(self._base_rows_only):  # each row pays for its own draft
                widths = choose_widths(drafts, chances, ratio, overhead)
                drafts = [d[:n] for d, n in zip(drafts, widths)]
            else:  # one dense forward: every row pays for the widest
                width = choose_width(drafts, chances, ratio, overhead)
                drafts = [d[:width] for d in drafts]
            self._forget([s for s, j, d in zip(rows, judges, drafts) if j is not None and j is s.chance and not d])
        return drafts, judges, drafting

    def drafters(self) -> list[str]:
        """What drafts in these steps, for /v1/models: prompt lookup, the quantized copy (none: [])."""
        parts = []
        if self.lookup is not None:
            c = self.lookup
            parts.append(f"ngram: prompt lookup{' first' if self.self_draft else ''} (n-grams of "
                         f"{c.prompt_lookup_min}-{c.prompt_lookup_max}, up to {c.num_speculative_tokens} tokens)")
        if self.self_draft is not None:
            parts.append(self.self_draft.describe())
        return parts

    def _timed_plain(self, rows: int, seconds: float, own_draft: bool) -> None:
        """A plain step of `rows` rows took `seconds`: what the draft choices weigh drafts against."""
        if self.lookup is not None or self.self_draft is not None:
            self.step_cost.observe(rows, seconds)
            if own_draft:
                self.self_draft.observe(rows, seconds)

    @staticmethod
    def _propose(seq: Sequence) -> list[int]:
        if seq.draft is None or seq.done or seq.aborted:
            return []
        return seq.draft.propose(seq.row.prompt_ids + seq.row.output_ids, DraftStage._room(seq))

    def _look_ahead(self, rows: list[Sequence], have: list[list[int]], judges: list) -> list[list[int]]:
        """Self-speculation: the draft from the model's quantized copy of each row that has none yet (`have`:
        prompt lookup's, whose chances `judges` hold), as long as the measured costs say it pays
        (self_draft.SelfDraft.choose; [] for every row: no drafting). A draft that raises costs only
        itself: the runner has rolled the cache back, the step goes on without it."""
        rooms = [self._room(s) if s.chance is not None and not (s.done or s.aborted or h) else 0
                 for s, h in zip(rows, have)]
        chances = [s.chance.p if room > 0 else None for s, room in zip(rows, rooms)]
        others = [(j.p, len(h)) for j, h in zip(judges, have) if h]  # checked this step anyway
        k = self.self_draft.choose(chances, *self.step_cost.shares(), packed=self.runner.packs_drafts(),
                                   most=max(rooms), others=others)
        if k == 0:
            self._forget([s for s, p in zip(rows, chances) if p is not None])
            return [[] for _ in rows]
        started = time.perf_counter()
        try:
            tokens = self.runner.look_ahead(self.self_draft, [s.row.output_ids[-1] for s in rows],
                                            [s.position for s in rows], k, self.max_model_len - 1)
        except Exception as exc:
            log.exception("self-speculation draft failed")
            self.self_draft.failed(exc)
            return [[] for _ in rows]
        self.self_draft.observe(len(rows), time.perf_counter() - started, drafted=k)
        return [t[:min(k, room)] for t, room in zip(tokens, rooms)]

    @staticmethod
    def _forget(seqs: list[Sequence]) -> None:
        """Rows that could have drafted and did not this step: their acceptance drifts back to the prior."""
        for seq in seqs:
            if seq.chance is not None:
                seq.chance.forget()

    @staticmethod
    def _room(seq: Sequence) -> int:
        """Draft tokens the row may take: the step also yields the model's own next token."""
        a = seq.acceptor
        return min(a.max_tokens, a.room) - a.generated - 1

    def _decode_drafts(self, rows: list[Sequence], drafts: list[list[int]], judges: list, started: float) -> None:
        """One step that checks every row's draft: position j of row i is accepted (as a plain decode step
        would accept it: sampling.pick_tokens, acceptance.py) while the model's token there equals the
        draft's; the first disagreement is the model's own token, so the output is unchanged. `judges[i]`
        (RowDraft or AcceptanceChance) learns how row i's draft fared."""
        fed = [[s.row.output_ids[-1], *d] for s, d in zip(rows, drafts)]
        logits, where = self.runner.verify(fed, [s.position for s in rows], compiled=self._base_rows_only)
        width = where.shape[1]
        kept = [1] * len(rows)  # fed columns each row keeps in the cache: its last token + accepted drafts
        alive = list(range(len(rows)))
        for j in range(width):
            now = [i for i in alive if j < len(fed[i])]
            if not now:
                break
            seqs = [rows[i] for i in now]
            picked = self._pick(logits[where[now, j]].float(), seqs)
            self._accept(seqs, picked)
            alive = []
            for i, token in zip(now, picked.tokens):
                if not (rows[i].done or rows[i].aborted) and j < len(drafts[i]) and token == drafts[i][j]:
                    kept[i] = j + 2
                    alive.append(i)
        for judge, draft, k in zip(judges, drafts, kept):
            if draft:
                judge.observe(len(draft), k - 1)
                self.spec.add(len(draft), k - 1)
        self.runner.settle(kept, width)
        self.step_cost.observe(logits.shape[0], time.perf_counter() - started, draft=True)  # positions computed


@dataclass
class SpecCounts:
    """Speculation so far (cumulative; read by EngineStats): drafts checked, tokens proposed, accepted."""

    drafts: int = 0
    proposed: int = 0
    accepted: int = 0

    def add(self, proposed: int, accepted: int) -> None:
        self.drafts += 1
        self.proposed += proposed
        self.accepted += accepted
