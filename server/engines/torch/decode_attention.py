"""slimserve's own attention kernel for decode steps and draft checks, built on the machine it runs on.

In the compiled decode step, attention was two fp32 batched matmuls around a fused softmax: every step
converted each layer's whole bf16 key and value cache to fp32 copies first, then ran the matmuls on
them. At 16 rows over ~170 cached positions (SmolLM2 bf16, AMD EPYC, 2 threads) that was ~9 ms of a
26 ms step (torch profiler: the fused softmax/convert kernel 14%, bmm 12%, the rotary/convert kernel 8%),
about as much as the linears' 14 ms. This kernel reads each cached key and value once, converts it
in registers, and keeps scores, softmax and the weighted sum in fp32 (the precision of the path it
replaces): for each (row, key/value head) the query heads of its group share every key and value
row loaded. The sums run in another order than the matmuls', so outputs equal that path to fp32
rounding (tests/test_decode_attention.py).

Queries are [rows, heads, w, dim] (w = 1: a decode step; w > 1: a draft check, causal within its w new
columns), keys and values [rows, kv_heads, length, dim] views of the cache buffers, the 0/1 mask
[rows, length]. A masked column gets the same finite floor as the matmul path, so a row with nothing to
attend to averages its values instead of producing NaN. C with AVX-512 or AVX2 intrinsics (plain C
elsewhere); exp from glibc's vector math library (libmvec); built for this CPU at first use
(native_build.py); `SLIMSERVE_ATTENTION_KERNEL=torch` keeps the matmul path.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform

import torch

from server.engines.torch import native_build

log = logging.getLogger(__name__)

enabled = os.environ.get("SLIMSERVE_ATTENTION_KERNEL", "own") != "torch"

SOURCE = r"""
/* the vector names this kernel adds to native_build.PRELUDE's */
#if VW == 16
extern __m512 _ZGVeN16v_expf(__m512);  /* glibc libmvec */
static inline vf ldb(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline vf max_(vf a, vf b) { return _mm512_max_ps(a, b); }
static inline vf sub_(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf div_(vf a, vf b) { return _mm512_div_ps(a, b); }
static inline float hmax(vf v) { return _mm512_reduce_max_ps(v); }
static inline vf exp_(vf v) { return _ZGVeN16v_expf(v); }
#elif VW == 8
extern __m256 _ZGVdN8v_expf(__m256);  /* glibc libmvec */
static inline vf ldb(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
static inline vf max_(vf a, vf b) { return _mm256_max_ps(a, b); }
static inline vf sub_(vf a, vf b) { return _mm256_sub_ps(a, b); }
static inline vf div_(vf a, vf b) { return _mm256_div_ps(a, b); }
static inline float hmax(vf v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline vf exp_(vf v) { return _ZGVdN8v_expf(v); }
#else
static inline vf ldb(const uint16_t *p) { return from_bf16(*p); }
static inline vf max_(vf a, vf b) { return a > b ? a : b; }
static inline vf sub_(vf a, vf b) { return a - b; }
static inline vf div_(vf a, vf b) { return a / b; }
static inline float hmax(vf v) { return v; }
static inline vf exp_(vf v) { return expf(v); }
#endif

#define PF 16  /* prefetch the key/value rows this many positions ahead: the cache streams from memory */
#define FLOOR (-FLT_MAX)  /* a masked score: finite, as in the matmul path */

#if VW == 16
/* four vectors' sums as one 4-lane vector */
static inline __m128 hsum4(vf a, vf b, vf c, vf d) {
    #define HALF(x) _mm256_add_ps(_mm512_castps512_ps256(x), \
                                  _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)))
    __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(HALF(a), HALF(b)), _mm256_hadd_ps(HALF(c), HALF(d)));
    #undef HALF
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}
#define SUMS4(out, a, b, c, d) _mm_storeu_ps(out, hsum4(a, b, c, d))
#elif VW == 8
static inline __m128 hsum4(vf a, vf b, vf c, vf d) {
    __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}
#define SUMS4(out, a, b, c, d) _mm_storeu_ps(out, hsum4(a, b, c, d))
#else
#define SUMS4(out, a, b, c, d) do { (out)[0] = a; (out)[1] = b; (out)[2] = c; (out)[3] = d; } while (0)
#endif

/* VW values at p (bf16 or fp32) as fp32 */
static inline vf ldx(const char *p, int bf16) { return bf16 ? ldb((const uint16_t *)p) : ldf((const float *)p); }
static inline float getx(const char *p, int64_t i, int bf16) {
    return bf16 ? from_bf16(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}
/* p[0..n) = softmax(p[0..n)) in place */
static void softmax(float *p, int64_t n) {
    int64_t i = 0;
    vf mv = set1(FLOOR);
    for (; i + VW <= n; i += VW) mv = max_(mv, ldf(p + i));
    float m = hmax(mv);
    for (; i < n; i++) m = p[i] > m ? p[i] : m;
    vf mm = set1(m), sv = set1(0.f);
    for (i = 0; i + VW <= n; i += VW) { vf e = exp_(sub_(ldf(p + i), mm)); stf(p + i, e); sv = add_(sv, e); }
    float s = hsum(sv);
    for (; i < n; i++) { p[i] = expf(p[i] - m); s += p[i]; }
    vf ss = set1(s);
    for (i = 0; i + VW <= n; i += VW) stf(p + i, div_(ldf(p + i), ss));
    for (; i < n; i++) p[i] /= s;
}

/* out[b, j, h * D + d] (contiguous [B, W, H * D]) = attention of query (b, h, j) over keys/values
   (b, h / (H / KVH), t < L); query j of a block of W sees the columns up to L - W + j and the mask's
   ones. Strides in elements, the last dimension contiguous. A task is (row, kv head, part of its group);
   its queries go four at a time, so every key and value vector loaded and converted feeds four. */
int slimserve_decode_attention(const void *q, const void *k, const void *v, const uint8_t *mask, void *out,
                                int64_t B, int64_t H, int64_t KVH, int64_t W, int64_t L, int64_t D,
                                int64_t qsb, int64_t qsh, int64_t qsw, int64_t ksb, int64_t ksh, int64_t kst,
                                int64_t vsb, int64_t vsh, int64_t vst, int64_t msb,
                                float scale, int bf16, int parts, int skip, int threads) {
    const int64_t G = H / KVH, GP = G / parts, tasks = B * KVH * parts, DV = D - D % VW;
    const size_t el = bf16 ? 2 : 4;
    int failed = 0;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t task = 0; task < tasks; task++) {
        const int64_t b = task / (KVH * parts), kh = (task / parts) % KVH, g0 = (task % parts) * GP;
        const uint8_t *mrow = mask + b * msb;
        /* qm: the task's queries (head in group * W + position); with skip, a new position whose own column
           is masked is padding (a draft check's shorter row) and is left out: its output stays as it was */
        int64_t *qm = (int64_t *)malloc(GP * W * sizeof(int64_t)), NQ = 0;
        float *qf = qm ? (float *)calloc(((GP * W + 3) / 4 * 4) * (D + L), sizeof(float)) : NULL;  /* queries, then scores */
        if (!qf) {
            free(qm);
            #pragma omp atomic write
            failed = 1;
            continue;
        }
        for (int64_t qi = 0; qi < GP * W; qi++)
            if (!skip || mrow[L - W + qi % W]) qm[NQ++] = qi;
        float *s = qf + ((NQ + 3) / 4 * 4) * D;
        for (int64_t qi = 0; qi < NQ; qi++) {
            const int64_t h = kh * G + g0 + qm[qi] / W, j = qm[qi] % W;
            const char *src = (const char *)q + (b * qsb + h * qsh + j * qsw) * el;
            for (int64_t d = 0; d < D; d++) qf[qi * D + d] = getx(src, d, bf16);
        }
        const char *kb = (const char *)k + (b * ksb + kh * ksh) * el, *vb = (const char *)v + (b * vsb + kh * vsh) * el;
        for (int64_t q0 = 0; q0 < NQ; q0 += 4) {  /* scores, four queries a pass */
            const float *f0 = qf + q0 * D, *f1 = f0 + D, *f2 = f1 + D, *f3 = f2 + D;
            float sums[4];
            for (int64_t t = 0; t < L; t++) {
                if (!mrow[t]) { for (int64_t i = q0; i < NQ && i < q0 + 4; i++) s[i * L + t] = FLOOR; continue; }
                const char *kt = kb + t * kst * el;
                for (int64_t c = 0; c < D * (int64_t)el; c += 64) {  /* the values too: the next pass reads them */
                    __builtin_prefetch(kt + PF * kst * el + c, 0, 3);
                    __builtin_prefetch(vb + (t + PF) * vst * el + c, 0, 3);
                }
                vf a0 = set1(0.f), a1 = a0, a2 = a0, a3 = a0;
                for (int64_t d = 0; d < DV; d += VW) {
                    vf kv = ldx(kt + d * el, bf16);
                    a0 = fma_(ldf(f0 + d), kv, a0); a1 = fma_(ldf(f1 + d), kv, a1);
                    a2 = fma_(ldf(f2 + d), kv, a2); a3 = fma_(ldf(f3 + d), kv, a3);
                }
                SUMS4(sums, a0, a1, a2, a3);
                for (int64_t d = DV; d < D; d++) {
                    const float kd = getx(kt, d, bf16);
                    sums[0] += f0[d] * kd; sums[1] += f1[d] * kd; sums[2] += f2[d] * kd; sums[3] += f3[d] * kd;
                }
                for (int64_t i = q0; i < NQ && i < q0 + 4; i++)
                    s[i * L + t] = t > L - W + qm[i] % W ? FLOOR : sums[i - q0] * scale;
            }
        }
        for (int64_t qi = 0; qi < NQ; qi++) softmax(s + qi * L, L);
        for (int64_t q0 = 0; q0 < NQ; q0 += 4) {  /* weighted values, four queries and two vectors a pass */
            const float *p0 = s + q0 * L, *p1 = p0 + L, *p2 = p1 + L, *p3 = p2 + L;
            float o[4][VW * 2];
            for (int64_t d = 0; d < D; d += 2 * VW) {
                const int64_t n = D - d < 2 * VW ? D - d : 2 * VW;
                if (n == 2 * VW) {
                    vf a0 = set1(0.f), a1 = a0, a2 = a0, a3 = a0, c0 = a0, c1 = a0, c2 = a0, c3 = a0;
                    for (int64_t t = 0; t < L; t++) {
                        const char *vt = vb + (t * vst + d) * el;
                        const vf x = ldx(vt, bf16), y = ldx(vt + VW * el, bf16);
                        const vf w0 = set1(p0[t]), w1 = set1(p1[t]), w2 = set1(p2[t]), w3 = set1(p3[t]);
                        a0 = fma_(w0, x, a0); a1 = fma_(w1, x, a1); a2 = fma_(w2, x, a2); a3 = fma_(w3, x, a3);
                        c0 = fma_(w0, y, c0); c1 = fma_(w1, y, c1); c2 = fma_(w2, y, c2); c3 = fma_(w3, y, c3);
                    }
                    stf(o[0], a0); stf(o[0] + VW, c0); stf(o[1], a1); stf(o[1] + VW, c1);
                    stf(o[2], a2); stf(o[2] + VW, c2); stf(o[3], a3); stf(o[3] + VW, c3);
                } else {  /* the last few columns of the head */
                    memset(o, 0, sizeof(o));
                    for (int64_t t = 0; t < L; t++) {
                        const char *vt = vb + (t * vst + d) * el;
                        for (int64_t e = 0; e < n; e++) {
                            const float x = getx(vt, e, bf16);
                            o[0][e] += p0[t] * x; o[1][e] += p1[t] * x; o[2][e] += p2[t] * x; o[3][e] += p3[t] * x;
                        }
                    }
                }
                for (int64_t i = q0; i < NQ && i < q0 + 4; i++) {
                    const int64_t h = kh * G + g0 + qm[i] / W, j = qm[i] % W, base = (b * W + j) * H * D + h * D + d;
                    for (int64_t e = 0; e < n; e++) {
                        if (bf16) ((uint16_t *)out)[base + e] = to_bf16(o[i - q0][e]);
                        else ((float *)out)[base + e] = o[i - q0][e];
                    }
                }
            }
        }
        free(qf);
        free(qm);
    }
    return failed;  /* 1: out of memory for a task's scores (the output is then incomplete) */
}
"""


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL | str:
    """The loaded kernel, or why there is none (never fatal: the matmul path stays)."""
    try:
        libs = ("-lmvec", "-lm") if platform.machine() in ("x86_64", "AMD64") else ("-lm",)  # vector exp: x86
        lib = native_build.load("decode_attention", SOURCE, libs=libs)
    except Exception as exc:  # noqa: BLE001
        log.warning("decode attention kernel not built, the matmul path runs instead: %s", exc)
        return f"{type(exc).__name__}: {exc}"
    fn = lib.slimserve_decode_attention
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 16 + [ctypes.c_float] + [ctypes.c_int] * 4
    return lib


def off_reason() -> str | None:
    """Why attention runs the matmul path instead of this kernel, or None (builds it on the first call)."""
    if not enabled:
        return "SLIMSERVE_ATTENTION_KERNEL=torch"
    lib = _library()
    return lib if isinstance(lib, str) else None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
           skip_padding: bool = False, parts: int | None = None) -> torch.Tensor:
    """q [b, heads, w, dim], k/v [b, kv_heads, length, dim] (views of the cache), mask [b, length] (bool or
    0/1) -> [b, w, heads * dim] in q's dtype. Call only where off_reason() is None. `skip_padding`: a new
    position whose own mask column is 0 (a shorter row of a draft check) is not computed; its output is
    zeros. `parts`: 1 (a task per row and kv head) or the group size (a task per query head); by default
    chosen from the thread count."""
    b, heads, w, dim = q.shape
    kv_heads, length = k.shape[1], k.shape[2]
    if q.dtype not in (torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"decode attention takes bf16 or fp32 alike, got {q.dtype}, {k.dtype}, {v.dtype}")
    if heads % kv_heads or mask.shape != (b, length) or k.shape != (b, kv_heads, length, dim) or v.shape != k.shape:
        raise ValueError(f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, mask {tuple(mask.shape)}")
    if any(t.device.type != "cpu" for t in (q, k, v, mask)):
        raise ValueError("decode attention runs on CPU tensors")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if mask.dtype not in (torch.bool, torch.uint8):  # bool is one 0/1 byte, read as is
        mask = mask.to(torch.uint8)
    mask = mask.contiguous()
    skip = skip_padding and w > 1
    out = (torch.zeros if skip else torch.empty)((b, w, heads * dim), dtype=q.dtype)
    threads = torch.get_num_threads()
    groups = heads // kv_heads
    if parts is None:  # few (row, kv head) tasks for the threads: split each group's heads
        parts = groups if b * kv_heads < 2 * threads else 1
    if parts not in (1, groups):
        raise ValueError(f"parts is 1 or the group size {groups}, not {parts}")
    failed = _library().slimserve_decode_attention(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), mask.data_ptr(), out.data_ptr(), b, heads, kv_heads, w, length,
        dim, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], mask.stride(0), scale,
        int(q.dtype == torch.bfloat16), parts, int(skip), threads)
    if failed:
        raise MemoryError(f"decode attention: no memory for the scores of {length} positions")
    return out


# the kernel as one op of a compiled graph (as linear_op.py: a Meta kernel gives the traced shape)
_LIB = torch.library.Library("slimserve", "FRAGMENT")
_LIB.define("attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scale, bool skip_padding=False) -> Tensor")
_LIB.impl("attention", attend, "CPU")
_LIB.impl("attention", lambda q, k, v, mask, scale, skip_padding=False: q.new_empty(
    (q.shape[0], q.shape[2], q.shape[1] * q.shape[3])), "Meta")
op = torch.ops.slimserve.attention.default
