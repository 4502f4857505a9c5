"""The PyTorch engine's waiting line (admission.py): the padded prefill budget and max_num_seqs bound who
joins a step, aborted waiters are dropped, and the idle hook (the engine frees its OpenMP threads there,
openmp.py) runs only when the engine thread is about to wait, not on every step with work queued."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from server.engines.torch.admission import Admission


@dataclass
class _Req:
    request_id: str


@dataclass
class _Seq:
    name: str
    prompt_len: int = 10
    aborted: bool = False
    req: _Req = field(init=False)

    def __post_init__(self):
        self.req = _Req(self.name)


def test_budget_and_max_num_seqs_bound_who_joins():
    line = Admission(max_num_seqs=3, max_prefill_tokens=40)
    for name, length in [("a", 10), ("b", 12), ("c", 8), ("d", 5)]:
        line.add(_Seq(name, length))
    _, new, _ = line.next_step(running=0)
    assert [s.name for s in new] == ["a", "b", "c"]  # padded to 12 x 3 = 36 <= 40; d would be the 4th
    _, new, _ = line.next_step(running=3)
    assert new == []  # the batch is full
    _, new, _ = line.next_step(running=2)
    assert [s.name for s in new] == ["d"]


def test_padded_prefill_budget():
    line = Admission(max_num_seqs=8, max_prefill_tokens=30)
    for name, length in [("a", 10), ("b", 20), ("c", 5)]:
        line.add(_Seq(name, length))
    _, new, _ = line.next_step(running=0)
    assert [s.name for s in new] == ["a"]  # a and b together pad to 2 x 20 = 40 > 30


def test_aborted_waiters_are_dropped():
    line = Admission(max_num_seqs=8, max_prefill_tokens=1000)
    line.add(_Seq("a"))
    line.add(_Seq("b"))
    line.abort("a")
    _, new, dropped = line.next_step(running=0)
    assert [s.name for s in new] == ["b"] and [s.name for s in dropped] == ["a"]


def test_idle_hook_runs_only_before_waiting():
    line = Admission(max_num_seqs=8, max_prefill_tokens=1000)
    calls = []
    line.add(_Seq("a"))
    line.next_step(running=0, on_idle=lambda: calls.append("idle"))
    line.next_step(running=1, on_idle=lambda: calls.append("idle"))  # rows decoding: no wait
    assert calls == []
    got = []
    waiter = threading.Thread(target=lambda: got.append(line.next_step(running=0, on_idle=lambda: calls.append("idle"))))
    waiter.start()
    deadline = time.monotonic() + 10
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert calls == ["idle"] and not got  # ran, and the engine thread now waits
    line.add(_Seq("b"))
    waiter.join(timeout=10)
    assert [s.name for s in got[0][1]] == ["b"] and calls == ["idle"]


def test_stop_ends_the_wait():
    line = Admission(max_num_seqs=8, max_prefill_tokens=1000)
    got = []
    waiter = threading.Thread(target=lambda: got.append(line.next_step(running=0)))
    waiter.start()
    line.stop()
    waiter.join(timeout=10)
    assert got == [None]
