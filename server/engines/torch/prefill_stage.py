"""The prefill stage of the batch scheduler (scheduler.py): new prompts start from their longest
cached prefix (prefix_cache.py), the prompts still prefilling compute their next chunk together
(chunking.py: a token budget per step while rows decode), and those done join the running batch
with their first token. Prompts that ask for prompt logprobs are prefilled whole, alone.

A mixin of BatchScheduler: it works on the scheduler's runner, queue, prefix cache, rows and
prefilling lists, and hands tokens to its acceptance (`_pick`, `_accept`, `_finish`, `_fail`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from server.engines.base import Chunk, TokenLogprob
from server.engines.torch.chunking import plan_chunks
from server.engines.torch.sampling import score_prompt

if TYPE_CHECKING:
    from server.engines.torch.scheduler import Sequence

log = logging.getLogger("server.engines.torch.scheduler")  # one logger name for the engine loop's messages


class PrefillStage:
    def _begin_prefill(self, new: list[Sequence]) -> None:
        """New prompts start prefilling from their longest cached prefix. Rows that score their prompt need
        every position's logits: they are prefilled whole, alone, at once (no cache, no chunks)."""
        for seq in new:
            if _scores_prompt(seq):
                self._prefill_scored(seq)
                continue
            if self.prefix_cache is not None:
                seq.computed, seq.kv = self.prefix_cache.lookup(seq.row.prompt_ids, seq.slot)
                seq.req.stats.cached_tokens = seq.computed
            self._prefilling.append(seq)

    def _prefill_step(self) -> None:
        """One forward over the next chunk of the prompts prefilling; those done join the batch."""
        for seq in self._prefilling:
            if seq.aborted and not seq.done:
                self._finish(seq, Chunk("", [], finish_reason="abort"))
        self._prefilling = [s for s in self._prefilling if not s.done]
        if not self._prefilling:
            return
        budget = self.chunk_tokens if self._rows else self.queue.max_prefill_tokens
        plan = plan_chunks([s.prompt_len - s.computed for s in self._prefilling], budget)
        self._extend([(s, n) for s, n in zip(self._prefilling, plan) if n])

    def _extend(self, group: list[tuple[Sequence, int]]) -> None:
        seqs = [s for s, _ in group]
        try:  # a failed prefill never touches the running batch; retried one by one, it fails only the culprit
            self._inject(seqs, "prefill")
            self._route_adapters(seqs)
            logits, kvs = self.runner.extend([s.kv for s in seqs],
                                             [s.row.prompt_ids[s.computed:s.computed + n] for s, n in group])
        except Exception as exc:
            if len(group) == 1:
                log.exception("prefill of %s failed", seqs[0].req.request_id)
                self._fail(seqs, exc)
            else:
                log.warning("prefill of %d sequences failed (%s); prefilling them one by one", len(group), exc)
                for item in group:
                    self._extend([item])
            return
        done = []
        for i, ((seq, n), kv) in enumerate(zip(group, kvs)):
            seq.computed += n
            seq.kv = kv
            if self.prefix_cache is not None:
                self.prefix_cache.insert(seq.row.prompt_ids[:seq.computed], seq.slot, kv)
            if seq.computed == seq.prompt_len:
                done.append(i)
        if not done:
            return
        joining = [seqs[i] for i in done]
        picked = self._pick(logits[done].float(), joining)
        self.runner.join_rows([s.kv for s in joining])
        joined = {id(s) for s in joining}
        for seq in joining:
            seq.kv = None
        self._prefilling = [s for s in self._prefilling if id(s) not in joined]
        self._rows.extend(joining)
        self._accept(joining, picked)

    def _prefill_scored(self, seq: Sequence) -> None:
        try:
            self._inject([seq], "prefill")
            self._route_adapters([seq])
            logits, rows = self.runner.prefill([seq.row.prompt_ids], every_position=True)
        except Exception as exc:
            log.exception("prefill of %s failed", seq.req.request_id)
            self._fail([seq], exc)
            return
        self._score_prompt(seq, logits[0])
        if seq.req.params.max_tokens == 0:  # echo with max_tokens 0: score the prompt, generate nothing
            self._finish(seq, Chunk("", [], finish_reason="length", prompt_logprobs=seq.prompt_logprobs))
            return
        picked = self._pick(logits[:, -1, :].float(), [seq])
        self.runner.join(rows)
        self._rows.append(seq)
        self._accept([seq], picked)

    def _score_prompt(self, seq: Sequence, logits: torch.Tensor) -> None:
        k = seq.req.params.prompt_logprobs
        if k is None:
            return
        ids = seq.row.prompt_ids
        dec = self.tokenizer.decode
        seq.prompt_logprobs = [TokenLogprob(dec([ids[0]]), None)] + [
            TokenLogprob(dec([token]), value, [(dec([t]), v) for t, v in top])
            for token, (value, top) in zip(ids[1:], score_prompt(logits, ids, k))]


def _scores_prompt(seq: Sequence) -> bool:
    p = seq.req.params
    return p.prompt_logprobs is not None or p.max_tokens == 0
