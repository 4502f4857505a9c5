"""The PyTorch engine's waiting line: requests queued from the event loop, jobs to run between steps,
and which waiting requests join the batch next (bounded by max_num_seqs and a padded prefill budget).
No torch here: plain bookkeeping under one condition variable, shared with the engine thread."""

from __future__ import annotations

import concurrent.futures
import threading
from collections import deque
from collections.abc import Callable
from typing import Protocol

from server.engines.base import GenerationRequest

Job = tuple[Callable[[], object], concurrent.futures.Future]


class Waiting(Protocol):
    req: GenerationRequest
    aborted: bool

    @property
    def prompt_len(self) -> int: ...


class Admission:
    def __init__(self, max_num_seqs: int, max_prefill_tokens: int):
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.cond = threading.Condition()
        self.pending: deque = deque()
        self.jobs: deque[Job] = deque()
        self.by_id: dict[str, Waiting] = {}
        self.stopping = False

    # ---- the event loop's side (each takes the lock) ---------------------------------------------
    def add(self, seq: Waiting) -> None:
        with self.cond:
            self.by_id[seq.req.request_id] = seq
            self.pending.append(seq)
            self.cond.notify()

    def abort(self, request_id: str) -> None:
        with self.cond:
            seq = self.by_id.get(request_id)
            if seq is not None:
                seq.aborted = True
                self.cond.notify()

    def add_job(self, job: Job) -> None:
        with self.cond:
            self.jobs.append(job)
            self.cond.notify()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()

    def waiting(self) -> int:
        return len(self.pending)

    def forget(self, request_id: str) -> None:
        with self.cond:
            self.by_id.pop(request_id, None)

    # ---- the engine thread's side ----------------------------------------------------------------
    def next_step(self, running: int, on_idle: Callable[[], None] | None = None
                  ) -> tuple[list[Job], list[Waiting], list[Waiting]] | None:
        """Wait for work; return (jobs, sequences joining the batch, sequences aborted while waiting),
        or None once stopping. `on_idle` runs when there is nothing to do, just before waiting (outside
        the lock: the event loop may queue work meanwhile)."""
        with self.cond:
            idle = self._nothing_to_do(running)
        if idle and on_idle is not None:
            on_idle()
        with self.cond:
            while self._nothing_to_do(running):
                self.cond.wait()
            if self.stopping:
                return None
            jobs, self.jobs = list(self.jobs), deque()
            new, dropped = self._admit(running)
            return jobs, new, dropped

    def _nothing_to_do(self, running: int) -> bool:
        return not self.pending and not running and not self.jobs and not self.stopping

    def _admit(self, running: int) -> tuple[list[Waiting], list[Waiting]]:
        new: list[Waiting] = []
        dropped: list[Waiting] = []
        longest = 0
        while self.pending and running + len(new) < self.max_num_seqs:
            seq = self.pending[0]
            if seq.aborted:
                dropped.append(self.pending.popleft())
                continue
            longest = max(longest, seq.prompt_len)
            if new and longest * (len(new) + 1) > self.max_prefill_tokens:  # padded prefill size
                break
            new.append(self.pending.popleft())
        return new, dropped

    def drain(self) -> tuple[list[Waiting], list[Job]]:
        """Everything still queued, for failing it when the engine stops."""
        with self.cond:
            self.stopping = True
            seqs, jobs = list(self.pending), list(self.jobs)
            self.pending.clear()
            self.jobs.clear()
        return seqs, jobs
