"""CPU kernels: a small C++/OpenMP library, compiled on first use and cached.

Weights use the ``pack_lanes`` layout (:mod:`loaq.kernels.layout`): one 64-byte load
of 16 words gives, for each shift t, the codes of 32 consecutive k as 16 pairs, one
pair per 32-bit lane, in the order of 32 contiguous 16-bit activations.

* ``M < DEQUANT_MIN_M`` (decode): fused unpack-and-multiply GEMV. Per group the
  integer codes are accumulated against x, then scaled once:
  ``y = sum_g s_g * sum_k u_k x_k - sum_g (uz_g s_g) * sum_{k in g} x_k``.

  - bf16 activations on CPUs with AVX512-BF16: ``vdpbf16ps`` on the pairs; a code is
    turned into the bf16 of ``128 + u`` by one OR (``0x4300 | u``, exact), and the
    offset joins the zero point. 4 output channels share each activation load; blocks
    of 8 tokens share each decoded weight vector, so this path runs up to
    ``M < DEQUANT_MIN_M_DOT``.
  - W4A4 on CPUs with AVX512-VNNI: ``vpdpwssd`` of the codes with the int16
    activation codes, exact int32 sums, then the reference's fp32 epilogue, with
    blocks of 8 tokens. It runs at every M, prefill included: it beats dequantize +
    GEMM by about 2x at 16-512 tokens, so W4A4 on these CPUs has no crossover.
  - otherwise (fp32 activations, older CPUs, ``USE_DOT = False``): portable fp32 FMAs
    (GCC vector extensions) against x copied in pair order, up to 4 tokens per
    decoded weight vector.
* larger M (prefill): the C++ code dequantizes the weight into a reused per-thread
  workspace in the activation dtype (bf16 rounding to nearest even) and
  ``F.linear`` runs oneDNN's GEMM on it; no dequantized weight outlives the call.

The library is built with ``g++ -O3 -march=native -fopenmp`` into
``$LOAQ_CACHE_DIR`` (default ``~/.cache/loaq``), keyed by a hash of the source,
flags and CPU model, so the dot-product paths exist exactly where the CPU has the
instructions (``features()``); it links the OpenMP runtime that torch has already
loaded. A prepared layer passes its pointers as one C struct (``CpuWeight.desc``):
at decode, Python overhead is a large part of a small layer's time.
Activations are bf16 or fp32 (fp16 is computed via fp32). W4A4 on CPU quantizes
activations in C++ (bit-identical to the reference quantizer); without VNNI it runs
the fp32 GEMV on the integer codes (products and sums of integers below 2**24 are
exact in fp32), and for large M a bf16 GEMM on them (the weight rounded to bf16).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loaq.kernels.layout import PackedLinear, pack_lanes, unpack_codes, unpack_zero_points
from loaq.kernels.w4a4_ref import ActQuant

__all__ = ["CpuWeight", "prepare_cpu", "cpu_wna16_matmul", "cpu_quantize_activations", "cpu_w4a4_matmul",
           "cpu_w4a4_linear", "features", "DEQUANT_MIN_M", "DEQUANT_MIN_M_DOT"]

DEQUANT_MIN_M = 8  # GEMV vs dequantize+oneDNN crossover at 4096², 1 thread (kernels.md)
# the dot-product GEMVs (8 tokens per decoded weight) stay ahead up to M = 16..32 on
# SmolLM2 shapes, and further on 4096² (weight traffic), 1 thread
DEQUANT_MIN_M_DOT = 32

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <omp.h>
#if defined(__AVX512BF16__) || defined(__AVX512VNNI__)
#include <immintrin.h>
#endif

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

typedef uint32_t v16u __attribute__((vector_size(64)));

static inline float hsum(v16f v) {
    float s = 0.f;
    for (int i = 0; i < 16; ++i) s += v[i];
    return s;
}

static inline int64_t group_of(int64_t k, int64_t gs, int64_t G) { return k / gs < G ? k / gs : G - 1; }

// ---- portable fp32 path (fp32 activations; bf16 ones where the CPU has no bf16 dot product) ----
// x is fp32 in "pair order": for each 32-chunk of k, its 16 even k, then its 16 odd k.
// y[m, n] for m in [m0, m0 + MB): one output channel, MB tokens.
template <int BITS, int MB>
static inline void row_gemv(const float* x, int64_t ldx, const int32_t* w, int64_t kw,
                            int64_t gs, int64_t G, const float* s, const float* zs,
                            const float* xg, float* y, int64_t ldy) {
    constexpr int H = 16 / BITS;
    constexpr int MASK = (1 << BITS) - 1;
    // accg: short FMA chains (flushed into accs every 4 chunks so that out-of-order
    // execution overlaps them); accs: the current group's sum; acc: scaled total
    v16f acc[MB], accs[MB], accg[MB];
    for (int m = 0; m < MB; ++m) { acc[m] = (v16f){}; accs[m] = (v16f){}; accg[m] = (v16f){}; }
    int64_t k = 0, g = 0, gend = gs;
    int chunk = 0;
    for (int64_t b = 0; b < kw; b += 16) {
        v16i wv;
        memcpy(&wv, w + b, 64);
        #pragma GCC unroll 8
        for (int t = 0; t < H; ++t) {
            v16i v = wv >> (BITS * t);
            v16f lo = __builtin_convertvector(v & MASK, v16f);
            v16f hi = __builtin_convertvector((v >> 16) & MASK, v16f);
            for (int m = 0; m < MB; ++m) {
                v16f xe, xo;
                memcpy(&xe, x + m * ldx + k, 64);
                memcpy(&xo, x + m * ldx + k + 16, 64);
                accg[m] += lo * xe + hi * xo;
            }
            k += 32;
            if ((++chunk & 3) == 0)
                for (int m = 0; m < MB; ++m) { accs[m] += accg[m]; accg[m] = (v16f){}; }
            if (k == gend && g < G) {
                for (int m = 0; m < MB; ++m) {
                    acc[m] += (accs[m] + accg[m]) * s[g];
                    accs[m] = (v16f){};
                    accg[m] = (v16f){};
                }
                ++g;
                gend += gs;
            }
        }
    }
    if (g < G)
        for (int m = 0; m < MB; ++m) acc[m] += (accs[m] + accg[m]) * s[g];
    for (int m = 0; m < MB; ++m) {
        float zt = 0.f;
        for (int64_t j = 0; j < G; ++j) zt += zs[j] * xg[m * G + j];
        y[m * ldy] = hsum(acc[m]) - zt;
    }
}

template <int BITS>
static void gemv(const float* x, int64_t M, int64_t ldx, const int32_t* w, int64_t N, int64_t kw,
                 int64_t gs, int64_t G, const float* s, const float* zs, const float* xg, float* y,
                 int nthreads) {
    #pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && N * kw > 32768)
    for (int64_t n = 0; n < N; ++n) {
        const int32_t* wr = w + n * kw;
        int64_t m = 0;
        for (; m + 4 <= M; m += 4)
            row_gemv<BITS, 4>(x + m * ldx, ldx, wr, kw, gs, G, s + n * G, zs + n * G, xg + m * G, y + m * N + n, N);
        for (; m < M; ++m)
            row_gemv<BITS, 1>(x + m * ldx, ldx, wr, kw, gs, G, s + n * G, zs + n * G, xg + m * G, y + m * N + n, N);
    }
}

// ---- pairwise dot products: vdpbf16ps (bf16 activations), vpdpwssd (W4A4 integer codes) ----
// One decoded lane holds the codes of k = 2l, 2l+1 in its 16-bit halves, the layout of 32
// contiguous 16-bit activations. bf16: each half is OR-ed with 0x4300, the bf16 of 128 + u
// (exact for u < 128), and the offset is removed with the zero point: uz + 128.
// NR output channels at a time share each activation load and give NR independent chains.
#if defined(__AVX512BF16__)
#define LOAQ_BF16_DOT 1
template <int BITS, int NR, int MB>
static inline void rows_bf16(const uint16_t* x, int64_t ldx, const int32_t* w, int64_t kw, int64_t kc,
                             int64_t gs, int64_t G, const float* s, const float* zt, float* y, int64_t ldy) {
    constexpr int H = 16 / BITS;
    const __m512i mask = _mm512_set1_epi32(((1 << BITS) - 1) * 0x10001);
    const __m512i off = _mm512_set1_epi32(0x43004300);
    __m512 acc[NR][MB], tot[NR][MB];
    for (int r = 0; r < NR; ++r)
        for (int m = 0; m < MB; ++m) { acc[r][m] = _mm512_setzero_ps(); tot[r][m] = _mm512_setzero_ps(); }
    int64_t k = 0, g = 0, gend = gs;
    auto chunk = [&](const __m512i* wv, int t) __attribute__((always_inline)) {
        __m512bh xv[MB];
        for (int m = 0; m < MB; ++m) xv[m] = (__m512bh)_mm512_loadu_si512(x + m * ldx + k);
        for (int r = 0; r < NR; ++r) {
            // (w >> BITS*t) & mask | off in one ternary-logic op: A&B | C = 0xEA
            __m512bh v = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi32(wv[r], BITS * t), mask, off, 0xEA);
            for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], v, xv[m]);
        }
        k += 32;
        if (k == gend && g < G) {
            for (int r = 0; r < NR; ++r) {
                __m512 sg = _mm512_set1_ps(s[r * G + g]);
                for (int m = 0; m < MB; ++m) {
                    tot[r][m] = _mm512_fmadd_ps(acc[r][m], sg, tot[r][m]);
                    acc[r][m] = _mm512_setzero_ps();
                }
            }
            ++g;
            gend += gs;
        }
    };
    int64_t full = kc / (32 * H) * 16;  // words of the blocks without padding chunks
    __m512i wv[NR];
    for (int64_t b = 0; b < full; b += 16) {
        for (int r = 0; r < NR; ++r) wv[r] = _mm512_loadu_si512(w + r * kw + b);
        #pragma GCC unroll 8
        for (int t = 0; t < H; ++t) chunk(wv, t);
    }
    if (full < kw) {  // the last block's chunks that hold codes (k < kc)
        for (int r = 0; r < NR; ++r) wv[r] = _mm512_loadu_si512(w + r * kw + full);
        for (int t = 0; k < kc; ++t) chunk(wv, t);
    }
    if (g < G)
        for (int r = 0; r < NR; ++r) {
            __m512 sg = _mm512_set1_ps(s[r * G + g]);
            for (int m = 0; m < MB; ++m) tot[r][m] = _mm512_fmadd_ps(acc[r][m], sg, tot[r][m]);
        }
    for (int m = 0; m < MB; ++m) {
        if constexpr (NR == 4) {  // the 4 horizontal sums at once
            __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(tot[0][m], tot[1][m]), _mm512_unpackhi_ps(tot[0][m], tot[1][m]));
            __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(tot[2][m], tot[3][m]), _mm512_unpackhi_ps(tot[2][m], tot[3][m]));
            __m512 t2 = _mm512_add_ps(_mm512_shuffle_ps(t0, t1, 0x44), _mm512_shuffle_ps(t0, t1, 0xEE));
            t2 = _mm512_add_ps(t2, _mm512_shuffle_f32x4(t2, t2, 0x4E));
            t2 = _mm512_add_ps(t2, _mm512_shuffle_f32x4(t2, t2, 0xB1));
            __m128 sum = _mm_sub_ps(_mm512_castps512_ps128(t2), _mm_loadu_ps(zt + m * ldy));
            _mm_storeu_ps(y + m * ldy, sum);
        } else {
            for (int r = 0; r < NR; ++r) y[m * ldy + r] = _mm512_reduce_add_ps(tot[r][m]) - zt[m * ldy + r];
        }
    }
}

// zsT: (uz + 128) * s transposed, fp32 [G, N]. zt [M, N]: the zero-point term of every output.
template <int BITS>
static void gemv_bf16(const uint16_t* x, int64_t M, int64_t ldx, const int32_t* w, int64_t N, int64_t kw,
                      int64_t kc, int64_t gs, int64_t G, const float* s, const float* zsT, const float* xg, float* zt,
                      float* y, int nthreads) {
    for (int64_t m = 0; m < M; ++m) {
        float* z = zt + m * N;
        for (int64_t n = 0; n < N; ++n) z[n] = 0.f;
        for (int64_t j = 0; j < G; ++j) {
            float xj = xg[m * G + j];
            const float* zr = zsT + j * N;
            for (int64_t n = 0; n < N; ++n) z[n] += zr[n] * xj;
        }
    }
    constexpr int NR = 4;
    int64_t nb = (N + NR - 1) / NR;
    #pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && N * kw > 32768)
    for (int64_t i = 0; i < nb; ++i) {
        int64_t n = i * NR;
        const int32_t* wr = w + n * kw;
        const float* sn = s + n * G;
        int64_t m = 0;
        if (n + NR <= N) {
            for (; m + 8 <= M; m += 8)  // 8 tokens per decoded weight vector, one channel at a time
                for (int r = 0; r < NR; ++r)
                    rows_bf16<BITS, 1, 8>(x + m * ldx, ldx, wr + r * kw, kw, kc, gs, G, sn + r * G,
                                          zt + m * N + n + r, y + m * N + n + r, N);
            for (; m + 2 <= M; m += 2)
                rows_bf16<BITS, NR, 2>(x + m * ldx, ldx, wr, kw, kc, gs, G, sn, zt + m * N + n, y + m * N + n, N);
            for (; m < M; ++m)
                rows_bf16<BITS, NR, 1>(x + m * ldx, ldx, wr, kw, kc, gs, G, sn, zt + m * N + n, y + m * N + n, N);
        } else {
            for (int64_t r = 0; n + r < N; ++r)
                for (m = 0; m < M; ++m)
                    rows_bf16<BITS, 1, 1>(x + m * ldx, ldx, wr + r * kw, kw, kc, gs, G, sn + r * G,
                                          zt + m * N + n + r, y + m * N + n + r, N);
        }
    }
}
#endif

#if defined(__AVX512VNNI__)
#define LOAQ_INT_DOT 1
// W4A4: exact int32 sums of u * xq over k (4-bit per-channel weights, |xq| <= 16).
// MB tokens (x rows ldx apart) against NR output channels; acc_out[m * NR + r].
template <int NR, int MB>
static inline void rows_int(const int16_t* x, int64_t ldx, const int32_t* w, int64_t kw, int64_t kc,
                            int32_t* acc_out) {
    const __m512i mask = _mm512_set1_epi32(0x000F000F);
    __m512i acc[NR][MB];
    for (int r = 0; r < NR; ++r)
        for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_si512();
    int64_t k = 0;
    for (int64_t b = 0; b < kw && k < kc; b += 16) {
        __m512i wv[NR];
        for (int r = 0; r < NR; ++r) wv[r] = _mm512_loadu_si512(w + r * kw + b);
        #pragma GCC unroll 4
        for (int t = 0; t < 4; ++t, k += 32) {
            if (k == kc) break;  // padding chunks of the last block
            __m512i xv[MB];
            for (int m = 0; m < MB; ++m) xv[m] = _mm512_loadu_si512(x + m * ldx + k);
            for (int r = 0; r < NR; ++r) {
                __m512i v = _mm512_and_si512(_mm512_srli_epi32(wv[r], 4 * t), mask);
                for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_dpwssd_epi32(acc[r][m], v, xv[m]);
            }
        }
    }
    for (int m = 0; m < MB; ++m)
        for (int r = 0; r < NR; ++r) acc_out[m * NR + r] = _mm512_reduce_add_epi32(acc[r][m]);
}
#endif



static inline v16u to_bf16_bits(v16f d) {  // round to nearest even, in the low 16 bits
    v16u u;
    memcpy(&u, &d, 64);
    return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}

template <int BITS>
static void dequant(const int32_t* w, int64_t N, int64_t kw, int64_t K, int64_t gs, int64_t G,
                    const float* s, const float* zs, void* out, int bf16, int nthreads) {
    constexpr int H = 16 / BITS;
    constexpr int MASK = (1 << BITS) - 1;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; ++n) {
        const float* sn = s + n * G;
        const float* zn = zs + n * G;
        int64_t k = 0;
        for (int64_t b = 0; b < kw && k < K; b += 16) {
            v16i wv;
            memcpy(&wv, w + n * kw + b, 64);
            for (int t = 0; t < H && k < K; ++t, k += 32) {
                int64_t g = group_of(k, gs, G);
                v16i v = wv >> (BITS * t);
                v16f lo = __builtin_convertvector(v & MASK, v16f) * sn[g] - zn[g];
                v16f hi = __builtin_convertvector((v >> 16) & MASK, v16f) * sn[g] - zn[g];
                int64_t cnt = K - k < 32 ? K - k : 32;
                if (bf16) {  // lane l = bf16 of k = 2l (low half) and 2l+1 (high half)
                    v16u pair = to_bf16_bits(lo) | (to_bf16_bits(hi) << 16);
                    if (cnt == 32) memcpy((uint16_t*)out + n * K + k, &pair, 64);  // constant size: inlined
                    else memcpy((uint16_t*)out + n * K + k, &pair, cnt * 2);
                } else {
                    float buf[32];
                    for (int l = 0; l < 16; ++l) { buf[2 * l] = lo[l]; buf[2 * l + 1] = hi[l]; }
                    memcpy((float*)out + n * K + k, buf, cnt * 4);
                }
            }
        }
    }
}

extern "C" {
int loaq_features(void) {
    int f = 0;
#ifdef LOAQ_BF16_DOT
    f |= 1;
#endif
#ifdef LOAQ_INT_DOT
    f |= 2;
#endif
    return f;
}

static inline float load_x(const void* x, int x_bf16, int64_t i) {
    if (!x_bf16) return ((const float*)x)[i];
    uint32_t u = (uint32_t)((const uint16_t*)x)[i] << 16;
    float v;
    memcpy(&v, &u, 4);
    return v;
}

// Per-token 4-bit quantizer, the formulas of w4a4_ref (IEEE division, round half to even).
static void act_quant_row(const void* x, int x_bf16, int64_t off, int64_t K, int sym, int8_t* codes, float* scale,
                          int32_t* zero, int32_t* rowsum) {
    float lo = 0.f, hi = 0.f;
    for (int64_t k = 0; k < K; ++k) {
        float v = load_x(x, x_bf16, off + k);
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
    }
    float amax = -lo > hi ? -lo : hi;
    float s = sym ? amax / 7.0f : (hi - lo) / 15.0f;
    if (s == 0.f) s = 1.f;
    float z = sym ? 0.f : nearbyintf(-lo / s);
    float qmin = sym ? -8.f : 0.f, qmax = sym ? 7.f : 15.f, shift = sym ? 0.f : 8.f;
    int32_t sum = 0;
    for (int64_t k = 0; k < K; ++k) {
        float q = nearbyintf(load_x(x, x_bf16, off + k) / s) + z;
        q = q < qmin ? qmin : (q > qmax ? qmax : q);
        int8_t c = (int8_t)(q - shift);
        codes[k] = c;
        sum += c;
    }
    *scale = s;
    *zero = (int32_t)(z - shift);
    *rowsum = sum;
}

void loaq_act_quant(const float* x, int64_t M, int64_t K, int sym, int8_t* codes, float* scale,
                    int32_t* zero, int32_t* rowsum, int nthreads) {
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t m = 0; m < M; ++m)
        act_quant_row(x, 0, m * K, K, sym, codes + m * K, scale + m, zero + m, rowsum + m);
}

static inline uint16_t bf16_rne(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// fp32 results [M, N] -> out (bf16 rounded to nearest even, or fp32)
static void store(const float* y, int64_t n, void* out, int out_bf16) {
    if (out_bf16) for (int64_t i = 0; i < n; ++i) ((uint16_t*)out)[i] = bf16_rne(y[i]);
    else memcpy(out, y, n * sizeof(float));
}

// One prepared layer (CpuWeight): packed [N, kw] int32, s / zs = uz * s fp32 [N, G], uz int32 [N, G].
typedef struct {
    const int32_t* w;
    int64_t N, K, kw, gs, G, bits;
    const float* s;
    const float* zs;
    const int32_t* uz;
    const float* zsT;  // (uz + 128) * s, transposed [G, N]: the bf16 dot path's zero points
} LoaqWeight;

// out [M, N] (bf16 or fp32) from x [M, K] (bf16 or fp32; row stride ldx). The prologue
// copies x zero-padded to the packed length (bf16 for the dot-product path, else fp32 in
// pair order) and sums it per quantization group.
// flags: 1 = x is bf16, 2 = out is bf16, 4 = use the dot-product path if the library has it
int loaq_gemv(const void* x, int64_t M, int64_t ldx, const LoaqWeight* wd, void* out, int flags, int nthreads) {
    int x_bf16 = flags & 1, out_bf16 = (flags >> 1) & 1, dot = (flags >> 2) & 1;
    const int32_t* w = wd->w;
    int64_t N = wd->N, K = wd->K, kw = wd->kw, gs = wd->gs, G = wd->G;
    int bits = (int)wd->bits;
    const float *s = wd->s, *zs = wd->zs;
    int64_t kp = kw * (32 / bits);
    int use_dot = 0;
#ifdef LOAQ_BF16_DOT
    use_dot = dot && x_bf16;
#endif
    float* xg = (float*)malloc((M * G + 2 * M * N) * sizeof(float));
    float* y = xg + M * G;
    float* zt = y + M * N;
    void* xp = aligned_alloc(64, ((M * kp * (use_dot ? 2 : 4)) + 63) / 64 * 64);
    if (!xg || !xp) { free(xg); free(xp); return 2; }
    for (int64_t m = 0; m < M; ++m) {
        for (int64_t g = 0, k = 0; g < G; ++g) {
            int64_t kend = g + 1 == G || (g + 1) * gs > K ? K : (g + 1) * gs;
            float sum = 0.f;
            if (x_bf16) {
                const uint16_t* xr = (const uint16_t*)x + m * ldx;
                #pragma omp simd reduction(+ : sum)
                for (int64_t j = k; j < kend; ++j) {
                    uint32_t u = (uint32_t)xr[j] << 16;
                    float v;
                    memcpy(&v, &u, 4);
                    sum += v;
                }
            } else {
                const float* xr = (const float*)x + m * ldx;
                #pragma omp simd reduction(+ : sum)
                for (int64_t j = k; j < kend; ++j) sum += xr[j];
            }
            k = kend;
            xg[m * G + g] = sum;
        }
        if (use_dot) {
            uint16_t* xr = (uint16_t*)xp + m * kp;
            memcpy(xr, (const uint16_t*)x + m * ldx, K * 2);
            memset(xr + K, 0, (kp - K) * 2);
        } else {
            float* xr = (float*)xp + m * kp;
            for (int64_t k = 0; k < kp; ++k)  // chunk c: even k at 32c + k/2, odd at 32c + 16 + k/2
                xr[(k & ~31) + ((k & 1) << 4) + ((k & 31) >> 1)] = k < K ? load_x(x, x_bf16, m * ldx + k) : 0.f;
        }
    }
    int rc = 0;
#ifdef LOAQ_BF16_DOT
    if (use_dot) {
        const uint16_t* xb = (const uint16_t*)xp;
        switch (bits) {
            case 2: gemv_bf16<2>(xb, M, kp, w, N, kw, (K + 31) / 32 * 32, gs, G, s, wd->zsT, xg, zt, y, nthreads); break;
            case 3: gemv_bf16<3>(xb, M, kp, w, N, kw, (K + 31) / 32 * 32, gs, G, s, wd->zsT, xg, zt, y, nthreads); break;
            case 4: gemv_bf16<4>(xb, M, kp, w, N, kw, (K + 31) / 32 * 32, gs, G, s, wd->zsT, xg, zt, y, nthreads); break;
            default: rc = 1;
        }
    } else
#endif
    {
        const float* xf = (const float*)xp;
        switch (bits) {
            case 2: gemv<2>(xf, M, kp, w, N, kw, gs, G, s, zs, xg, y, nthreads); break;
            case 3: gemv<3>(xf, M, kp, w, N, kw, gs, G, s, zs, xg, y, nthreads); break;
            case 4: gemv<4>(xf, M, kp, w, N, kw, gs, G, s, zs, xg, y, nthreads); break;
            default: rc = 1;
        }
    }
    if (rc == 0) store(y, M * N, out, out_bf16);
    free(xp); free(xg);
    return rc;
}

// W4A4, 4-bit per-channel weights: out[m, n] = float(sum_k (a - za) (u - uz_n)) * sx_m * s_n
// (the epilogue of w4a4_ref), the integer sum exact (int32 vpdpwssd). Returns 3 where the
// library has no integer dot product.
int loaq_w4a4_gemv(const int8_t* codes, const int32_t* zero, const float* sx, int64_t M, const LoaqWeight* wd,
                   void* out, int out_bf16, int nthreads) {
#ifdef LOAQ_INT_DOT
    const int32_t* w = wd->w;
    int64_t N = wd->N, K = wd->K, kw = wd->kw;
    const int32_t* uz = wd->uz;
    const float* s = wd->s;
    int64_t kp = kw * 8, kc = (K + 31) / 32 * 32;
    int16_t* xq = (int16_t*)aligned_alloc(64, (M * kp * 2 + 63) / 64 * 64);
    int32_t* xsum = (int32_t*)malloc(M * sizeof(int32_t));
    float* y = (float*)malloc(M * N * sizeof(float));
    if (!xq || !xsum || !y) { free(xq); free(xsum); free(y); return 2; }
    #pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && M * kp > 65536)
    for (int64_t m = 0; m < M; ++m) {
        int32_t sum = 0;
        for (int64_t k = 0; k < kp; ++k) {
            int16_t v = k < K ? (int16_t)(codes[m * K + k] - zero[m]) : 0;
            xq[m * kp + k] = v;
            sum += v;
        }
        xsum[m] = sum;
    }
    constexpr int NR = 4;
    int64_t nb = (N + NR - 1) / NR;
    #pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && N * kw > 32768)
    for (int64_t i = 0; i < nb; ++i) {
        int64_t n = i * NR;
        int32_t acc[8 * NR];
        auto finish = [&](int64_t m0, int64_t mb, int64_t nr) {  // the reference's fp32 epilogue
            for (int64_t m = m0; m < m0 + mb; ++m)
                for (int64_t r = 0; r < nr; ++r)
                    y[m * N + n + r] = (float)(acc[(m - m0) * nr + r] - uz[n + r] * xsum[m]) * sx[m] * s[n + r];
        };
        if (n + NR <= N) {
            int64_t m = 0;
            for (; m + 8 <= M; m += 8) {  // 8 tokens per decoded weight vector, one channel at a time
                for (int r = 0; r < NR; ++r) {
                    int32_t a8[8];
                    rows_int<1, 8>(xq + m * kp, kp, w + (n + r) * kw, kw, kc, a8);
                    for (int j = 0; j < 8; ++j) acc[j * NR + r] = a8[j];
                }
                finish(m, 8, NR);
            }
            for (; m < M; ++m) {
                rows_int<NR, 1>(xq + m * kp, kp, w + n * kw, kw, kc, acc);
                finish(m, 1, NR);
            }
        } else {
            for (int64_t m = 0; m < M; ++m) {
                for (int64_t r = 0; n + r < N; ++r) rows_int<1, 1>(xq + m * kp, kp, w + (n + r) * kw, kw, kc, acc + r);
                finish(m, 1, N - n);
            }
        }
    }
    store(y, M * N, out, out_bf16);
    free(xq); free(xsum); free(y);
    return 0;
#else
    return 3;
#endif
}

// Both W4A4 steps in one call (any M on VNNI CPUs): quantize x [M, K] (fp32, or bf16 if x_bf16; row
// stride ldx) per token as loaq_act_quant does, then loaq_w4a4_gemv.
int loaq_w4a4_linear(const void* x, int x_bf16, int64_t M, int64_t ldx, int sym, const LoaqWeight* wd,
                     void* out, int out_bf16, int nthreads) {
    int64_t K = wd->K, kc = (M * K + 3) & ~(int64_t)3;  // codes, then 4-byte aligned sx, zero, rowsum
    int8_t* codes = (int8_t*)malloc(kc + M * 12);
    if (!codes) return 2;
    float* sx = (float*)(codes + kc);
    int32_t* zero = (int32_t*)(sx + M);
    int32_t* rowsum = zero + M;
    #pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && M * K > 65536)
    for (int64_t m = 0; m < M; ++m)
        act_quant_row(x, x_bf16, m * ldx, K, sym, codes + m * K, sx + m, zero + m, rowsum + m);
    int rc = loaq_w4a4_gemv(codes, zero, sx, M, wd, out, out_bf16, nthreads);
    free(codes);
    return rc;
}

int loaq_dequant(const LoaqWeight* wd, void* out, int bf16, int nthreads) {
    const int32_t* w = wd->w;
    int64_t N = wd->N, K = wd->K, kw = wd->kw, gs = wd->gs, G = wd->G;
    const float *s = wd->s, *zs = wd->zs;
    switch (wd->bits) {
        case 2: dequant<2>(w, N, kw, K, gs, G, s, zs, out, bf16, nthreads); return 0;
        case 3: dequant<3>(w, N, kw, K, gs, G, s, zs, out, bf16, nthreads); return 0;
        case 4: dequant<4>(w, N, kw, K, gs, G, s, zs, out, bf16, nthreads); return 0;
    }
    return 1;
}
}
"""

_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]


@functools.cache
def _library() -> ctypes.CDLL:
    """Compile (once per source/flags/CPU) and load the kernel library."""
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu += next((line for line in f if line.startswith("model name")), "")
    key = hashlib.sha256((_SOURCE + " ".join(_FLAGS) + cpu).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("LOAQ_CACHE_DIR", Path.home() / ".cache" / "loaq"))
    path = cache / f"loaq_cpu_kernels_{key}.so"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            src = Path(tmp) / "kernels.cpp"
            src.write_text(_SOURCE)
            out = Path(tmp) / path.name
            cmd = [os.environ.get("CXX", "g++"), *_FLAGS, str(src), "-o", str(out)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"building the loaq CPU kernels failed: {' '.join(cmd)}\n{proc.stderr}")
            os.replace(out, path)  # atomic: concurrent builders race harmlessly
    lib = ctypes.CDLL(str(path))
    i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.loaq_features.argtypes = []
    lib.loaq_gemv.argtypes = [ptr, i64, i64, ptr, ptr, cint, cint]
    lib.loaq_w4a4_gemv.argtypes = [ptr, ptr, ptr, i64, ptr, ptr, cint, cint]
    lib.loaq_w4a4_linear.argtypes = [ptr, cint, i64, i64, cint, ptr, ptr, cint, cint]
    lib.loaq_act_quant.argtypes = [ptr, i64, i64, cint, ptr, ptr, ptr, ptr, cint]
    lib.loaq_dequant.argtypes = [ptr, ptr, cint, cint]
    return lib


class _Desc(ctypes.Structure):
    """The C ``LoaqWeight``: pointers and sizes of a prepared layer, passed as one argument."""

    _fields_ = [("w", ctypes.c_void_p), ("N", ctypes.c_int64), ("K", ctypes.c_int64), ("kw", ctypes.c_int64),
                ("gs", ctypes.c_int64), ("G", ctypes.c_int64), ("bits", ctypes.c_int64), ("s", ctypes.c_void_p),
                ("zs", ctypes.c_void_p), ("uz", ctypes.c_void_p), ("zsT", ctypes.c_void_p)]


@dataclass(frozen=True)
class CpuWeight:
    """Kernel-ready CPU weight: ``packed`` in ``pack_lanes``, fp32 ``scales``, ``zs = uz*scale``, ``uz``."""

    packed: torch.Tensor  # int32 [N, Kp / pf]
    scales: torch.Tensor  # fp32 [N, G]
    zs: torch.Tensor  # fp32 [N, G]
    uz: torch.Tensor  # int32 [N, G], the unsigned zero points
    zs128_t: torch.Tensor  # fp32 [G, N], ``(uz + 128) * scale`` transposed (the bf16 dot path)
    bits: int
    n: int
    k: int
    group_size: int  # Kp when per-channel
    desc: _Desc = field(init=False, repr=False, compare=False)
    addr: int = field(init=False, repr=False, compare=False)  # of desc

    def __post_init__(self) -> None:
        t = (self.packed, self.scales, self.zs, self.uz, self.zs128_t)
        assert all(x.is_contiguous() and x.device.type == "cpu" for x in t), "CpuWeight tensors: contiguous, on CPU"
        desc = _Desc(self.packed.data_ptr(), self.n, self.k, self.packed.shape[1], self.group_size,
                     self.scales.shape[1], self.bits, self.scales.data_ptr(), self.zs.data_ptr(), self.uz.data_ptr(),
                     self.zs128_t.data_ptr())
        object.__setattr__(self, "desc", desc)  # the tensors above keep the pointers valid
        object.__setattr__(self, "addr", ctypes.addressof(desc))

    @property
    def kp(self) -> int:
        return self.packed.shape[1] * (32 // self.bits)


def prepare_cpu(w: PackedLinear) -> CpuWeight:
    """One-time repack of checkpoint tensors into the CPU layout."""
    n, k = w.shape
    g = w.weight_scale.shape[1]
    packed = pack_lanes(unpack_codes(w.weight_packed, w.bits, k), w.bits).contiguous()
    scales = w.weight_scale.float().contiguous()
    uz = unpack_zero_points(w.weight_zero_point, w.bits, n, g)
    kp = packed.shape[1] * (32 // w.bits)
    group = w.group_size or kp
    assert group % 32 == 0, f"CPU kernels need group sizes that are multiples of 32, got {group}"
    zs128_t = ((uz.float() + 128) * scales).t().contiguous()
    return CpuWeight(packed, scales, (uz.float() * scales).contiguous(), uz.int().contiguous(), zs128_t, w.bits, n,
                     k, group)


_SCRATCH = threading.local()


def _workspace(n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """A reused per-thread buffer: a fresh multi-MB tensor costs a page fault per 4 KiB."""
    buf = getattr(_SCRATCH, str(dtype), None)
    if buf is None or buf.numel() < n * k:
        buf = torch.empty(n * k, dtype=dtype)
        setattr(_SCRATCH, str(dtype), buf)
    return buf[: n * k].view(n, k)


def _dequantize(w: CpuWeight, dtype: torch.dtype) -> torch.Tensor:
    """Dense weight [N, K] in a reused workspace: valid until the next call on this thread."""
    out = _workspace(w.n, w.k, dtype)
    rc = _library().loaq_dequant(w.addr, out.data_ptr(), int(dtype == torch.bfloat16),
                                 torch.get_num_threads())
    assert rc == 0, f"loaq_dequant failed with code {rc}"
    return out


@functools.cache
def features() -> frozenset[str]:
    """The dot-product paths of this build: ``bf16`` (AVX512-BF16), ``int`` (AVX512-VNNI)."""
    f = _library().loaq_features()
    return frozenset(name for bit, name in ((1, "bf16"), (2, "int")) if f & bit)


# Use the dot-product paths where the library has them; False runs the portable fp32
# code everywhere (the tests run both).
USE_DOT = True


def _gemv(x: torch.Tensor, w: CpuWeight, out_dtype: torch.dtype) -> torch.Tensor:
    """[M, N] in out_dtype (bf16 or fp32) from fp32 or bf16 activations [M, K] (row stride free)."""
    m = x.shape[0]
    y = torch.empty(m, w.n, dtype=out_dtype)  # sizes as arguments: faster than a tuple
    flags = (x.dtype is torch.bfloat16) | (out_dtype is torch.bfloat16) << 1 | USE_DOT << 2
    rc = _library().loaq_gemv(x.data_ptr(), m, x.stride(0), w.addr, y.data_ptr(), flags, torch.get_num_threads())
    assert rc == 0, f"loaq_gemv failed with code {rc}"
    return y


_NATIVE = (torch.bfloat16, torch.float32)


def _dequant_min_m(dtype: torch.dtype) -> int:
    """The M from which dequantize + oneDNN GEMM beats the fused GEMV."""
    return DEQUANT_MIN_M_DOT if dtype is torch.bfloat16 and USE_DOT and "bf16" in features() else DEQUANT_MIN_M


def _int_dot() -> bool:
    """Whether W4A4 runs the integer dot-product kernel: at every M where the CPU has VNNI. It reads each
    decoded weight vector for 8 tokens and beats both the bf16 oneDNN GEMM and dequantize + GEMM at every M
    measured (16..512 tokens, SmolLM2 shapes, 1 thread: 1.4-1.9x the bf16 GEMM, about 2x dequantize + GEMM;
    benchmarks/results/kernels.md), so it has no prefill crossover."""
    return USE_DOT and "int" in features()


def cpu_wna16_matmul(x: torch.Tensor, w: CpuWeight) -> torch.Tensor:
    """``x @ W.T`` for x [..., K] in bf16/fp32/fp16 on CPU; returns x.dtype."""
    shape, dtype = x.shape, x.dtype  # each tensor attribute costs ~0.1-0.2 us: read them once
    assert shape[-1] == w.k, f"x has K={shape[-1]}, weight has K={w.k}"
    if len(shape) == 2 and dtype in _NATIVE and shape[0] < _dequant_min_m(dtype) and x.stride(1) == 1:
        return _gemv(x, w, dtype)  # decode: the shortest path, Python overhead counts here
    x2 = x.reshape(-1, w.k)
    dtype = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
    if x2.shape[0] >= _dequant_min_m(dtype):
        y = torch.nn.functional.linear(x2.to(dtype), _dequantize(w, dtype))
    else:
        y = _gemv(x2.to(dtype).contiguous(), w, dtype)
    return y.to(x.dtype).reshape(*x.shape[:-1], w.n)


def cpu_quantize_activations(x: torch.Tensor, sym: bool) -> ActQuant:
    """Per-token 4-bit quantization of x [M, K] on CPU, bit-identical to the reference."""
    x = x.float().contiguous()
    m, k = x.shape
    out = ActQuant(torch.empty((m, k), dtype=torch.int8), torch.empty(m), torch.empty(m, dtype=torch.int32),
                   torch.empty(m, dtype=torch.int32))
    _library().loaq_act_quant(x.data_ptr(), m, k, int(sym), out.codes.data_ptr(), out.scale.data_ptr(),
                              out.zero.data_ptr(), out.rowsum.data_ptr(), torch.get_num_threads())
    return out


def cpu_w4a4_matmul(act: ActQuant, w: CpuWeight, out_dtype: torch.dtype) -> torch.Tensor:
    """W4A4 on CPU: ``sx * ((a - za) @ ((b - zb) * sw).T)``, exact integer sums."""
    assert w.bits == 4 and w.scales.shape[1] == 1, "W4A4 needs 4-bit per-channel weights"
    m = act.codes.shape[0]
    if _int_dot():
        y = torch.empty((m, w.n), dtype=torch.bfloat16 if out_dtype == torch.bfloat16 else torch.float32)
        rc = _library().loaq_w4a4_gemv(act.codes.data_ptr(), act.zero.data_ptr(), act.scale.data_ptr(), m,
                                       w.addr, y.data_ptr(), y.dtype == torch.bfloat16,
                                       torch.get_num_threads())
        assert rc == 0, f"loaq_w4a4_gemv failed with code {rc}"
        return y.to(out_dtype)
    xq = act.codes.float() - act.zero.float()[:, None]
    if m >= DEQUANT_MIN_M:  # integers |xq| <= 16 are exact in bf16
        y = torch.nn.functional.linear(xq.bfloat16(), _dequantize(w, torch.bfloat16)).float()
    else:
        y = _gemv(xq, w, torch.float32)
    return (y * act.scale[:, None]).to(out_dtype)


def cpu_w4a4_linear(x: torch.Tensor, w: CpuWeight, sym: bool) -> torch.Tensor:
    """W4A4 ``x @ W.T`` for x [M, K]: per-token activation quantization, then the integer
    GEMM; returns x.dtype. On VNNI CPUs both steps run in one C call."""
    if x.dtype in _NATIVE and x.stride(-1) == 1 and _int_dot():
        y = torch.empty(x.shape[0], w.n, dtype=x.dtype)
        rc = _library().loaq_w4a4_linear(x.data_ptr(), x.dtype is torch.bfloat16, x.shape[0], x.stride(0), sym,
                                         w.addr, y.data_ptr(), x.dtype is torch.bfloat16, torch.get_num_threads())
        assert rc == 0, f"loaq_w4a4_linear failed with code {rc}"
        return y
    return cpu_w4a4_matmul(cpu_quantize_activations(x, sym), w, x.dtype)
