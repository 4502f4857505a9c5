"""slimserve's own int8 weight-only matmul for few rows (decode), built on the machine it runs on.

torch's `aten._weight_int8pack_mm` reads half the bytes of a bf16 matmul, but for one decode row it
streams them slowly: on SmolLM2's decode shapes (AMD EPYC, AVX-512 bf16, 2 threads, weights streamed
from memory) ~26 GB/s, while oneDNN's bf16 matmul streams ~40 GB/s, so load-time int8 decoded only
~1.15-1.3x faster than bf16. This kernel is the plain loop — each output row's dot product with
the activations in fp32, four weight rows at a time so one activation load feeds four FMAs — plus
software prefetch of the weight rows ahead, which is what made it pay (without it the same loop ran
0.83-0.89x torch's kernel; with it 1.45-1.67x, ~38-44 GB/s). Written in C with AVX-512 or AVX2 intrinsics (plain C on
other x86 targets), built for this CPU at first use (native_build.py), on torch's own OpenMP
runtime with torch's thread count, passed on each call. bf16 activations and outputs are
converted inside the kernel (round to nearest even), fp32 passes straight through; accumulation is
fp32, as in torch's kernel. Rows above `MAX_ROWS` go to torch's kernel, which wins on bigger batches.
Where no C compiler works, `available()` is False with the reason, and the layer keeps torch's kernel.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os

import torch

from server.engines.torch import native_build

log = logging.getLogger(__name__)

MAX_ROWS = 2  # measured crossover (tests/bench/int8_gemv.py): 1.45-1.67x at 1 row, 1.00-1.18x at 2, 0.75x at 4
enabled = os.environ.get("SLIMSERVE_INT8_KERNEL", "own") != "torch"  # "torch": always torch's kernel (benches)

SOURCE = r"""
#define PF 16  /* prefetch this many weight rows ahead (what made the loop pay: 0.85x torch's kernel without) */

/* VW int8 weights as fp32 (native_build.PRELUDE has the rest of the vector names) */
#if VW == 16
static inline vf cvt(const int8_t *p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p))); }
#elif VW == 8
static inline vf cvt(const int8_t *p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p))); }
#else
static inline vf cvt(const int8_t *p) { return (float)*p; }
#endif

static inline void put(void *y, int bf16, int64_t i, float v) {
    if (bf16) ((uint16_t *)y)[i] = to_bf16(v); else ((float *)y)[i] = v;
}
static inline float tail(const float *x, const int8_t *w, int64_t k, int64_t K) {
    float s = 0.f; for (; k < K; k++) s += x[k] * (float)w[k]; return s;
}

/* y[m, n] = scales[n] * sum_k x[m, k] * w[n, k] (+ bias[n]); x and y bf16 (`bf16`) or fp32, w int8 [N, K]
   row-major, scales and bias fp32. Four weight rows at a time share each activation load. */
void slimserve_int8_gemv(const void *x, const int8_t *w, const float *scales, const float *bias, void *y,
                         int64_t M, int64_t N, int64_t K, int bf16, int threads) {
    float *xf = (float *)malloc(sizeof(float) * M * K);
    for (int64_t i = 0; i < M * K; i++) xf[i] = bf16 ? from_bf16(((const uint16_t *)x)[i]) : ((const float *)x)[i];
    const int64_t KV = K - K % VW;
    const int64_t blocks = (N + 3) / 4;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n = b * 4;
        if (n + 4 > N) {
            for (int64_t r = n; r < N; r++)
                for (int64_t m = 0; m < M; m++)
                    put(y, bf16, m * N + r, tail(xf + m * K, w + r * K, 0, K) * scales[r] + (bias ? bias[r] : 0.f));
            continue;
        }
        const int8_t *w0 = w + n * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
        const int64_t ahead = n + 4 + PF <= N ? PF * K : 0;
        for (int64_t m = 0; m < M; m++) {
            const float *xm = xf + m * K;
            vf a0 = set1(0.f), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t k = 0; k < KV; k += VW) {
                if ((k & 63) == 0) {  /* one prefetch per cache line of each row, never past the last row */
                    __builtin_prefetch(w0 + k + ahead, 0, 3); __builtin_prefetch(w1 + k + ahead, 0, 3);
                    __builtin_prefetch(w2 + k + ahead, 0, 3); __builtin_prefetch(w3 + k + ahead, 0, 3);
                }
                vf xv = ldf(xm + k);
                a0 = fma_(xv, cvt(w0 + k), a0); a1 = fma_(xv, cvt(w1 + k), a1);
                a2 = fma_(xv, cvt(w2 + k), a2); a3 = fma_(xv, cvt(w3 + k), a3);
            }
            float s0 = hsum(a0) + tail(xm, w0, KV, K), s1 = hsum(a1) + tail(xm, w1, KV, K);
            float s2 = hsum(a2) + tail(xm, w2, KV, K), s3 = hsum(a3) + tail(xm, w3, KV, K);
            int64_t o = m * N + n;
            put(y, bf16, o, s0 * scales[n] + (bias ? bias[n] : 0.f));
            put(y, bf16, o + 1, s1 * scales[n + 1] + (bias ? bias[n + 1] : 0.f));
            put(y, bf16, o + 2, s2 * scales[n + 2] + (bias ? bias[n + 2] : 0.f));
            put(y, bf16, o + 3, s3 * scales[n + 3] + (bias ? bias[n + 3] : 0.f));
        }
    }
    free(xf);
}
"""


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL | str:
    """The loaded kernel, or why there is none. Any failure leaves torch's kernel in place."""
    try:
        lib = native_build.load("int8_gemv", SOURCE)
    except Exception as exc:  # noqa: BLE001 - a kernel that cannot be had is never fatal
        log.warning("int8 decode kernel not built, torch's kernel runs instead: %s", exc)
        return f"{type(exc).__name__}: {exc}"
    fn = lib.slimserve_int8_gemv
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [ctypes.c_int] * 2
    return lib


def available() -> bool:
    """Whether the kernel runs here (built, loaded, on torch's OpenMP runtime); builds it on first call."""
    return not isinstance(_library(), str)


def why_not() -> str | None:
    lib = _library()
    return lib if isinstance(lib, str) else None


def off_reason() -> str | None:
    """Why decode rows run torch's kernel instead of this one, or None where this one runs (switched on,
    then built and loaded: the build happens on the first call)."""
    return "SLIMSERVE_INT8_KERNEL=torch" if not enabled else why_not()


def gemv(x2: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x2 [rows, in] contiguous bf16 or fp32, weight int8 [out, in] contiguous, scales (and bias) fp32 [out]
    -> [rows, out] in x2's dtype. Call only where available()."""
    rows, k = x2.shape
    n = weight.shape[0]
    if x2.dtype not in (torch.bfloat16, torch.float32) or scales.dtype != torch.float32 or \
            weight.dtype != torch.int8 or not (x2.is_contiguous() and weight.is_contiguous()):
        raise ValueError("int8_gemv takes contiguous bf16/fp32 rows, int8 weights and fp32 scales")
    y = torch.empty((rows, n), dtype=x2.dtype)
    _library().slimserve_int8_gemv(x2.data_ptr(), weight.data_ptr(), scales.data_ptr(),
                                   None if bias is None else bias.data_ptr(), y.data_ptr(), rows, n, k,
                                   int(x2.dtype == torch.bfloat16), torch.get_num_threads())
    return y
