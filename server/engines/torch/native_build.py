"""Building slimserve's own C kernels (int8_gemv.py, decode_attention.py) on the machine that runs them.

Each kernel is a C source string compiled at first use with `gcc -O3 -march=native -fopenmp` (about a
second) for this CPU's vector unit, into a cache folder (`SLIMSERVE_KERNEL_CACHE`, default
~/.cache/slimserve/kernels) under a name keyed on the source, the flags, the compiler and the CPU's
flags: a kernel built for one vector ISA is never loaded on another (see
compiled_decode.use_isa_cache_dir for what that costs), and a process beside this one sees the whole
file or none (written to a temporary name, then renamed). A cached file that does not load (cut short
on a full disk, say) is built again once.

A kernel runs on torch's own OpenMP runtime: the process already holds `libgomp.so.1`, the name the
kernel links against. That is checked at load; where the kernel would bind another runtime (a torch
built with Intel's, say) it is refused, since two thread teams on the same cores stall each other.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

# What every kernel's source starts with (`PRELUDE + source`): the vector unit this compiler targets
# (-march=native: 16 floats with AVX-512, 8 with AVX2 + FMA, else plain C) behind one small set of
# names, and bf16 <-> fp32 as torch rounds (to nearest even, NaN kept a NaN).
PRELUDE = r"""
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <math.h>
#include <float.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define VW 16
typedef __m512 vf;
static inline vf ldf(const float *p) { return _mm512_loadu_ps(p); }
static inline void stf(float *p, vf v) { _mm512_storeu_ps(p, v); }
static inline vf set1(float x) { return _mm512_set1_ps(x); }
static inline vf fma_(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf add_(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline float hsum(vf v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
#define VW 8
typedef __m256 vf;
static inline vf ldf(const float *p) { return _mm256_loadu_ps(p); }
static inline void stf(float *p, vf v) { _mm256_storeu_ps(p, v); }
static inline vf set1(float x) { return _mm256_set1_ps(x); }
static inline vf fma_(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf add_(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline float hsum(vf v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#else
#define VW 1
typedef float vf;
static inline vf ldf(const float *p) { return *p; }
static inline void stf(float *p, vf v) { *p = v; }
static inline vf set1(float x) { return x; }
static inline vf fma_(vf a, vf b, vf c) { return a * b + c; }
static inline vf add_(vf a, vf b) { return a + b; }
static inline float hsum(vf v) { return v; }
#endif

static inline float from_bf16(uint16_t v) { uint32_t u = (uint32_t)v << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t to_bf16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
"""
CACHE = Path(os.environ.get("SLIMSERVE_KERNEL_CACHE", Path.home() / ".cache" / "slimserve" / "kernels"))
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno"]


def cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def build(name: str, source: str, libs: tuple[str, ...] = (), rebuild: bool = False) -> Path:
    """The shared library of PRELUDE + `source` for this CPU, built unless cached. `libs`: linker flags
    after the source (e.g. "-lmvec")."""
    source = PRELUDE + source
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler (gcc or $CC) on PATH")
    about = subprocess.run([cc, "--version"], capture_output=True, timeout=30, check=True).stdout
    version = about.decode(errors="replace").strip().splitlines()[:1] or [cc]
    flags = [*FLAGS, *libs]
    key = hashlib.sha256("\n".join([source, " ".join(flags), version[0], cpu_flags()]).encode()).hexdigest()[:16]
    target = CACHE / f"{name}-{key}.so"
    if target.exists() and not rebuild:
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        src = Path(tmp) / f"{name}.c"
        src.write_text(source)
        out = Path(tmp) / target.name
        done = subprocess.run([cc, *FLAGS, str(src), "-o", str(out), *libs], capture_output=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed: {done.stderr.decode(errors='replace').strip()[-500:]}")
        os.replace(out, target)
    return target


def load(name: str, source: str, libs: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Build (or find) and load the kernel; raises with the reason where it cannot run here."""
    path = build(name, source, libs)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:  # a damaged cached file: built again, once
        lib = ctypes.CDLL(str(build(name, source, libs, rebuild=True)))
    if not _same_runtime(lib):
        raise RuntimeError("the kernel would run on another OpenMP runtime than torch's")
    return lib


def _same_runtime(lib: ctypes.CDLL) -> bool:
    """Whether the kernel's OpenMP calls resolve to the runtime torch loaded."""
    from server.engines.torch.openmp import _runtime

    torch_omp = _runtime()
    address = lambda l: ctypes.cast(l.omp_get_max_threads, ctypes.c_void_p).value  # noqa: E731
    return torch_omp is not None and address(lib) == address(torch_omp)
