"""slimserve's own 4-bit group-quantized matmul for few rows (decode), on torch's packed int4 weights.

torch's `aten._weight_int4pack_mm_for_cpu` reads a quarter of bf16's bytes, yet load-time int4 decoded
one row no faster than int8 on slimserve's int8 kernel (compiled, in process: 154.7 against 152.0 tok/s,
SmolLM2, AMD EPYC, 2 threads): at one row it streams its weights at about half the int8 kernel's rate.
This kernel reads the same packed tensor and the same [in / group, out, 2] bf16 scales and zeros, so
the layer keeps one copy of its weights, torch's kernel taking the larger batches.

torch packs the weights for its own vector width (`_convert_weight_to_int4pack_for_cpu`): blocks of 64
output rows under AVX-512 dispatch, 32 under AVX2, each input position of a block one run of bytes whose
low nibbles are the block's first half of rows and high nibbles the second. `packed_block()` finds which
by packing a probe pattern in this process; another layout (torch's default dispatch, or a future
torch) leaves the kernel off. Per group of inputs, each output row's sum of x * q runs in fp32 vectors
(one vector lane per output row, so no horizontal sums), then w = (q - 8) * scale + zero is applied
once per group: sum x*w = scale * (sum x*q - 8 sum x) + zero * sum x. Accumulation is fp32, as in
torch's kernel; only the summation order differs. Built for this CPU at first use (native_build.py);
bf16 activations (the dtype load-time int4 computes in where bf16 is fast); `SLIMSERVE_INT4_KERNEL=torch`
keeps torch's kernel.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os

import torch

from server.engines.torch import native_build

log = logging.getLogger(__name__)

MAX_ROWS = 2
enabled = os.environ.get("SLIMSERVE_INT4_KERNEL", "own") != "torch"

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#define PFB 8192  /* prefetch the packed weights this many bytes ahead */

#if defined(__AVX512F__)
#define VW 16
typedef __m512 vf;
static inline vf set1(float x) { return _mm512_set1_ps(x); }
static inline vf fma_(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf sub_(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline void stf(float *p, vf v) { _mm512_storeu_ps(p, v); }
/* VW bytes: the low nibbles as rows 0..VW-1, the high nibbles as the same rows of the block's other half */
static inline void nibbles(const uint8_t *p, vf *lo, vf *hi) {  /* widen the bytes first: one load-convert */
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    *lo = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)));
    *hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
}
/* VW (scale, zero) bf16 pairs as two fp32 vectors */
static inline void pairs(const uint32_t *p, vf *s, vf *z) {
    const __m512i v = _mm512_loadu_si512((const void *)p);
    *s = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    *z = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xffff0000u)));
}
#elif defined(__AVX2__) && defined(__FMA__)
#define VW 8
typedef __m256 vf;
static inline vf set1(float x) { return _mm256_set1_ps(x); }
static inline vf fma_(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf sub_(vf a, vf b) { return _mm256_sub_ps(a, b); }
static inline void stf(float *p, vf v) { _mm256_storeu_ps(p, v); }
static inline void nibbles(const uint8_t *p, vf *lo, vf *hi) {
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    *lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15)));
    *hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
}
static inline void pairs(const uint32_t *p, vf *s, vf *z) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)p);
    *s = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    *z = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u)));
}
#else
#define VW 1
typedef float vf;
static inline vf set1(float x) { return x; }
static inline vf fma_(vf a, vf b, vf c) { return a * b + c; }
static inline vf sub_(vf a, vf b) { return a - b; }
static inline void stf(float *p, vf v) { *p = v; }
static inline void nibbles(const uint8_t *p, vf *lo, vf *hi) { *lo = (float)(*p & 15); *hi = (float)(*p >> 4); }
static inline void pairs(const uint32_t *p, vf *s, vf *z) {
    uint32_t a = *p << 16, b = *p & 0xffff0000u; memcpy(s, &a, 4); memcpy(z, &b, 4);
}
#endif

#define MAXNV (64 / VW)  /* row vectors of the widest block */

static inline float from_bf16(uint16_t v) { uint32_t u = (uint32_t)v << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t to_bf16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* one block of BN output rows, inlined per block width so its loops unroll into registers */
static inline __attribute__((always_inline)) void block(const float *xf, const float *xsum, const uint8_t *w,
        const uint32_t *sz, float *out, int64_t M, int64_t N, int64_t K, int64_t G, int64_t n0, const int BN) {
    const int NV = BN / VW, U = BN / 2 / VW;
    vf y[2][MAXNV], a[2][MAXNV];
    for (int m = 0; m < 2; m++) for (int v = 0; v < NV; v++) y[m][v] = set1(0.f);
    for (int64_t g = 0; g < K / G; g++) {
        for (int m = 0; m < 2; m++) for (int v = 0; v < NV; v++) a[m][v] = set1(0.f);
        if (g + 4 < K / G)  /* a later group's scales: one row of [K / G, N] pairs away, beyond any stream */
            for (int c = 0; c < BN * 4; c += 64) __builtin_prefetch((const char *)(sz + (g + 4) * N + n0) + c, 0, 3);
        for (int64_t k = g * G; k < (g + 1) * G; k++) {
            const uint8_t *wk = w + k * (BN / 2);
            if (((k * (BN / 2)) & 63) == 0) __builtin_prefetch(wk + PFB, 0, 3);
            const vf x0 = set1(xf[k]), x1 = set1(M > 1 ? xf[K + k] : 0.f);
            for (int u = 0; u < U; u++) {
                vf lo, hi;
                nibbles(wk + u * VW, &lo, &hi);
                a[0][u] = fma_(x0, lo, a[0][u]); a[0][U + u] = fma_(x0, hi, a[0][U + u]);
                if (M > 1) { a[1][u] = fma_(x1, lo, a[1][u]); a[1][U + u] = fma_(x1, hi, a[1][U + u]); }
            }
        }
        for (int v = 0; v < NV; v++) {  /* vector v holds rows v * VW .. (v + 1) * VW - 1 of the block */
            vf s, z;
            pairs(sz + g * N + n0 + v * VW, &s, &z);
            for (int m = 0; m < M; m++) {
                const vf xs = set1(xsum[m * (K / G) + g]);
                y[m][v] = fma_(s, sub_(a[m][v], set1(8.f * xsum[m * (K / G) + g])), fma_(z, xs, y[m][v]));
            }
        }
    }
    for (int m = 0; m < M; m++) for (int v = 0; v < NV; v++) stf(out + m * BN + v * VW, y[m][v]);
}

/* y[m, n] = sum_k x[m, k] * ((q[n, k] - 8) * scale[k / G, n] + zero[k / G, n]) for M <= 2 rows; x and y bf16,
   q packed by torch in blocks of BN rows, scales and zeros bf16 pairs [K / G, N, 2]. */
int slimserve_int4_gemv(const uint16_t *x, const uint8_t *w, const uint32_t *sz, uint16_t *y,
                        int64_t M, int64_t N, int64_t K, int64_t G, int64_t BN, int threads) {
    if (M < 1 || M > 2 || (BN != 32 && BN != 64) || N % BN || K % G || BN % (2 * VW)) return 1;
    float *xf = (float *)malloc(sizeof(float) * (M * K + M * (K / G)));
    if (!xf) return 2;
    float *xsum = xf + M * K;
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < K / G; g++) {
            float s = 0.f;
            for (int64_t k = g * G; k < (g + 1) * G; k++) s += (xf[m * K + k] = from_bf16(x[m * K + k]));
            xsum[m * (K / G) + g] = s;
        }
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < N / BN; b++) {
        float out[2 * 64];
        if (BN == 64) block(xf, xsum, w + b * K * 32, sz, out, M, N, K, G, b * 64, 64);
        else block(xf, xsum, w + b * K * 16, sz, out, M, N, K, G, b * 32, 32);
        for (int64_t m = 0; m < M; m++)
            for (int64_t r = 0; r < BN; r++) y[m * N + b * BN + r] = to_bf16(out[m * BN + r]);
    }
    free(xf);
    return 0;
}
"""


@functools.lru_cache(maxsize=None)
def packed_block() -> int | None:
    """Output rows per block of torch's int4 packing in this process (64: AVX-512 dispatch, 32: AVX2), or
    None where the packing is neither layout this kernel reads."""
    n, k = 128, 64
    q = ((torch.arange(n)[:, None] * 7 + torch.arange(k)[None, :] * 3 + torch.arange(n)[:, None] // 5) % 16).int()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1).reshape(-1)
    for bn in (64, 32):
        blocks = q.reshape(n // bn, bn, k)
        ours = (blocks[:, :bn // 2] | (blocks[:, bn // 2:] << 4)).transpose(1, 2).reshape(-1).to(torch.uint8)
        if torch.equal(packed, ours):
            return bn
    return None


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL | str:
    try:
        if packed_block() is None:
            raise RuntimeError("torch packs int4 weights in a layout this kernel does not read")
        lib = native_build.load("int4_gemv", SOURCE)
    except Exception as exc:  # noqa: BLE001 - never fatal: torch's kernel stays
        log.warning("int4 decode kernel off, torch's kernel runs instead: %s", exc)
        return f"{type(exc).__name__}: {exc}"
    fn = lib.slimserve_int4_gemv
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5 + [ctypes.c_int]
    return lib


def off_reason() -> str | None:
    """Why decode rows run torch's int4 kernel instead of this one, or None (builds it on the first call)."""
    if not enabled:
        return "SLIMSERVE_INT4_KERNEL=torch"
    lib = _library()
    return lib if isinstance(lib, str) else None


def takes(out_features: int, compute_dtype: torch.dtype) -> bool:
    """Whether a layer of this width and dtype can run here (bf16; whole blocks of torch's packing)."""
    return compute_dtype == torch.bfloat16 and off_reason() is None and out_features % packed_block() == 0


def gemv(x2: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """x2 [rows <= MAX_ROWS, in] bf16 contiguous, torch's packed weight [out, in / 2] uint8, scales and zeros
    [in / group, out, 2] bf16 -> [rows, out] bf16. Call only where takes() said so."""
    rows, k = x2.shape
    n = scales_and_zeros.shape[1]
    if x2.dtype != torch.bfloat16 or scales_and_zeros.dtype != torch.bfloat16 or rows > MAX_ROWS or \
            not (x2.is_contiguous() and packed.is_contiguous() and scales_and_zeros.is_contiguous()):
        raise ValueError("int4_gemv takes up to two contiguous bf16 rows and bf16 scales and zeros")
    y = torch.empty((rows, n), dtype=torch.bfloat16)
    failed = _library().slimserve_int4_gemv(x2.data_ptr(), packed.data_ptr(), scales_and_zeros.data_ptr(),
                                            y.data_ptr(), rows, n, k, group_size, packed_block(),
                                            torch.get_num_threads())
    if failed:
        raise RuntimeError(f"int4_gemv refused rows {rows}, out {n}, in {k}, group {group_size} (code {failed})")
    return y
