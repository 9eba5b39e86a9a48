// LoaQ CPU kernels: built with g++ -O3 -march=native -fopenmp and loaded by loaq/kernels/cpu.py,
// which documents the algorithms; weights in the pack_lanes layout of loaq/kernels/layout.py.
// The int-returning entry points return 0 on success, 1 for a bit width other than 2/3/4,
// 2 when a workspace allocation fails, 3 when the W4A4 dot-product path was not built (no AVX512-VNNI).
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
