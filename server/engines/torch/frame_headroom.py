"""Run a thread's work above a large Python frame-stack chunk, so no call in a hot loop pays an mmap.

CPython (3.11+) keeps each thread's Python frames in "data stack" chunks: the first one 16 KiB, and a
new chunk is mmapped when a frame does not fit in what is left of the current one and munmapped when
that frame returns; nothing is kept for the next call. A call made over and over right at a chunk's
end pays an mmap and a munmap every time, and each munmap flushes the TLB on every core the process
runs on (an inter-processor interrupt that stalls the other core's OpenMP worker too).

That happened to the compiled decode step on the engine thread: inductor's generated `call` (~10 KiB
of locals for SmolLM2's 30 layers) ended 200 bytes short of the root chunk's end, so each of the
step's ~120 linears (a Python kernel, linear_op.py) mmapped a chunk of its own: 48,400 mmap/munmap
pairs in 400 steps (strace), and a step took 13 ms against 9.9 ms on the main thread, where the same
frames happened to land elsewhere (2-core AMD EPYC, bf16, one row).

`run_with_headroom(fn)` calls fn from a frame too large for any chunk a thread starts with, so CPython
mmaps one 256 KiB chunk for it, once, and everything fn calls runs in the ~125 KiB left above it.
"""

from __future__ import annotations

from collections.abc import Callable

_SLOTS = 16400  # ~128 KiB of locals: CPython gives the frame a fresh 256 KiB chunk, ~125 KiB spare above it
# (a 30-layer graph's frames take ~17 KiB; a deeper model's generated `call` grows with its layers)


def _frame_holder(slots: int):
    """A function whose frame has `slots` local variables (never assigned: only the frame's size matters)."""
    names = ", ".join(f"_{i}" for i in range(slots))
    source = f"def hold(fn):\n    if False:\n        {names} = (None,) * {slots}\n    return fn()\n"
    scope: dict = {}
    exec(compile(source, "<frame_headroom>", "exec"), scope)  # noqa: S102 - generated from a constant
    return scope["hold"]


_hold = _frame_holder(_SLOTS)


def run_with_headroom(fn: Callable[[], object]) -> object:
    """fn(), called from above a large frame (see the module doc); fn's result."""
    return _hold(fn)


def frame_slots() -> int:
    """How many slots the holding frame has (a test checks the locals really count)."""
    return _hold.__code__.co_nlocals
