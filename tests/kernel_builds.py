"""Building slimserve's C kernels for another target than this CPU, in a test: `-march=x86-64-v3` (AVX2 +
FMA, the build an AVX2-only EPYC gets) or `x86-64` (the plain-C path), into a temporary cache, the
kernel's loaded library forgotten before and after so the rest of the run keeps the native build."""

from __future__ import annotations

import contextlib
import platform

import pytest

from server.engines.torch import native_build

MARCHES = ["x86-64-v3", "x86-64"]  # AVX2 + FMA; plain C


@contextlib.contextmanager
def built_for(march: str, kernel, monkeypatch, folder):
    """Inside: `kernel` (a module with a cached `_library`) loads a build for `march` from `folder`."""
    if platform.machine() != "x86_64":
        pytest.skip("x86-64 targets")
    monkeypatch.setattr(native_build, "CACHE", folder)
    monkeypatch.setattr(native_build, "FLAGS",
                        [f"-march={march}" if f == "-march=native" else f for f in native_build.FLAGS])
    kernel._library.cache_clear()
    try:
        yield
    finally:
        kernel._library.cache_clear()
