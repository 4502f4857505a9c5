"""Freeing the calling thread's idle OpenMP team before the engine thread takes over the compute.

torch's CPU kernels run on OpenMP (libgomp in the PyPI CPU wheels), and libgomp keeps one team of
worker threads per thread that ever ran a parallel region. The model is loaded on the main thread
(which leaves a team there, idle) and then run on the engine's worker thread (which gets a team of
its own). With more OpenMP threads alive than CPUs, libgomp throttles its spin-wait to ~1000
iterations, so the worker team falls asleep between the ~600 parallel regions of a decode step and
each one pays a futex wake-up: measured on a 2-core AMD EPYC, 2 threads, SmolLM2 bf16, a decode step
on the worker thread took 31 ms (1 row) and 48 ms (16 rows) against 18 and 33 ms on the main thread.
`omp_pause_resource_all(omp_pause_hard)` (OpenMP 5.0) frees the calling thread's team; called on
the main thread once the models are loaded, the worker thread's step ran in 18.7 / 33.7 ms. The
loading thread may run parallel code again (a new team is made), so this is called where a thread is
done with compute for now: after the models are loaded (factory.build_engines), when an engine
starts, and when an engine thread runs out of work (its own team, so that several engines in one
process do not keep each other's teams throttled).
"""

from __future__ import annotations

import ctypes
import functools
import glob
import logging
import os

log = logging.getLogger(__name__)

OMP_PAUSE_HARD = 2


@functools.lru_cache(maxsize=1)
def _runtime():
    """The OpenMP runtime torch itself loaded (its own copy in torch/lib), or None."""
    import torch

    libdir = os.path.join(os.path.dirname(torch.__file__), "lib")
    for pattern in ("libgomp*.so*", "libiomp5*.so*", "libomp*.so*", "libomp*.dylib"):
        for path in sorted(glob.glob(os.path.join(libdir, pattern))):
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            if hasattr(lib, "omp_pause_resource_all"):
                return lib
    return None


def release_idle_team() -> bool:
    """Free the calling thread's idle OpenMP threads; False where the runtime cannot (or is absent)."""
    lib = _runtime()
    if lib is None:
        return False
    ok = lib.omp_pause_resource_all(OMP_PAUSE_HARD) == 0
    if not ok:
        log.debug("omp_pause_resource_all refused (inside a parallel region?)")
    return ok
