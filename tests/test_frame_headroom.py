"""frame_headroom: a call repeated at a frame-stack chunk's end pays a fresh chunk (page faults) every time;
above the holding frame no depth within reach does."""

from __future__ import annotations

import resource
import sys
import threading

import pytest

from server.engines.torch.frame_headroom import frame_slots, run_with_headroom

CALLS = 400
DEPTHS = range(0, 220)  # ~120 bytes a level: well past a 16 KiB root chunk


def _leaf():  # a frame larger than a level of _faults_at, so the level nearest a chunk's end leaves it no room
    if False:
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = a8 = a9 = b0 = b1 = b2 = b3 = b4 = b5 = b6 = b7 = b8 = b9 = None
        c0 = c1 = c2 = c3 = c4 = c5 = c6 = c7 = c8 = c9 = d0 = d1 = d2 = d3 = d4 = d5 = d6 = d7 = d8 = d9 = None
    return None


def _faults_at(depth: int) -> int:
    """Minor page faults of CALLS calls to a small function made `depth` frames down."""
    if depth:
        return _faults_at(depth - 1)
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for _ in range(CALLS):
        _leaf()
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before


def _worst_depth(headroom: bool) -> int:
    """The most page faults any depth gave, measured on a fresh thread (a fresh root chunk)."""
    out = []

    def scan():
        out.append(max(_faults_at(d) for d in DEPTHS))

    thread = threading.Thread(target=(lambda: run_with_headroom(scan)) if headroom else scan)
    thread.start()
    thread.join()
    return out[0]


@pytest.mark.skipif(not (sys.implementation.name == "cpython" and sys.platform == "linux"),
                    reason="CPython's frame chunks and Linux's per-thread fault counts")
def test_no_depth_pays_a_chunk_per_call_above_the_holder():
    if _worst_depth(headroom=False) < CALLS:  # the churn this guards against is not there to begin with
        pytest.skip("this CPython keeps a spare frame chunk: no depth pays a chunk per call")
    assert _worst_depth(headroom=True) < CALLS // 10


def test_holder_frame_is_large_and_transparent():
    assert frame_slots() >= 8192
    assert run_with_headroom(lambda: 42) == 42
    with pytest.raises(ValueError, match="boom"):
        run_with_headroom(lambda: (_ for _ in ()).throw(ValueError("boom")))
