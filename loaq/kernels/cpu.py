"""CPU kernels: a small C++/OpenMP library, compiled on first use and cached.

Weights use the ``pack_lanes`` layout (:mod:`loaq.kernels.layout`): one 64-byte load
of 16 words gives, for each of the ``pf`` shifts, the codes of 16 consecutive k,
which are converted to fp32 and multiplied with 16 contiguous activations. GCC
vector extensions map that onto AVX-512 (or pairs of AVX2 registers).

* ``M < DEQUANT_MIN_M`` (decode): fused unpack-and-FMA GEMV, up to 4 tokens
  per decoded weight vector, parallel over output channels. Per group the integer
  codes are accumulated against x, then scaled once:
  ``y = sum_g s_g * sum_k u_k x_k - sum_g (uz_g s_g) * sum_{k in g} x_k``.
* larger M (prefill): the C++ code dequantizes the weight into a reused per-thread
  workspace in the activation dtype (bf16 rounding to nearest even) and
  ``F.linear`` runs oneDNN's GEMM on it; no dequantized weight outlives the call.

The library is built with ``g++ -O3 -march=native -fopenmp`` into
``$LOAQ_CACHE_DIR`` (default ``~/.cache/loaq``), keyed by a hash of the source,
flags and CPU model; it links the OpenMP runtime that torch has already loaded.
Activations are bf16 or fp32 (fp16 is computed via fp32). W4A4 on CPU quantizes
activations in C++ (bit-identical to the reference quantizer) and runs the same GEMV on the integer
codes (products and sums of integers below 2**24 are exact in fp32), or for large M
a bf16 GEMM on them (the weight rounded to bf16).
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
from dataclasses import dataclass
from pathlib import Path

import torch

from loaq.kernels.layout import PackedLinear, pack_lanes, unpack_codes, unpack_zero_points
from loaq.kernels.w4a4_ref import ActQuant

__all__ = ["CpuWeight", "prepare_cpu", "cpu_wna16_matmul", "cpu_quantize_activations", "cpu_w4a4_matmul",
           "DEQUANT_MIN_M"]

DEQUANT_MIN_M = 8  # GEMV vs dequantize+oneDNN crossover at 4096², 1 thread (kernels.md)

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <omp.h>

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

static inline float hsum(v16f v) {
    float s = 0.f;
    for (int i = 0; i < 16; ++i) s += v[i];
    return s;
}

// y[m, n] for m in [m0, m0 + MB): one output channel, MB tokens.
template <int BITS, int MB>
static inline void row_gemv(const float* x, int64_t ldx, const int32_t* w, int64_t kw,
                            int64_t gs, int64_t G, const float* s, const float* zs,
                            const float* xg, float* y, int64_t ldy) {
    constexpr int PF = 32 / BITS;
    constexpr int MASK = (1 << BITS) - 1;
    // accg: short FMA chains (flushed into accs every 8 chunks so that out-of-order
    // execution overlaps them); accs: the current group's sum; acc: scaled total
    v16f acc[MB], accs[MB], accg[MB];
    for (int m = 0; m < MB; ++m) { acc[m] = (v16f){}; accs[m] = (v16f){}; accg[m] = (v16f){}; }
    int64_t k = 0, g = 0, gend = gs;
    int chunk = 0;
    for (int64_t b = 0; b < kw; b += 16) {
        v16i wv;
        memcpy(&wv, w + b, 64);
        #pragma GCC unroll 16
        for (int t = 0; t < PF; ++t) {
            v16f cf = __builtin_convertvector((wv >> (BITS * t)) & MASK, v16f);
            for (int m = 0; m < MB; ++m) {
                v16f xv;
                memcpy(&xv, x + m * ldx + k, 64);
                accg[m] += cf * xv;
            }
            k += 16;
            if ((++chunk & 7) == 0)
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
    #pragma omp parallel for schedule(static) num_threads(nthreads) if (N * kw > 32768)
    for (int64_t n = 0; n < N; ++n) {
        const int32_t* wr = w + n * kw;
        int64_t m = 0;
        for (; m + 4 <= M; m += 4)
            row_gemv<BITS, 4>(x + m * ldx, ldx, wr, kw, gs, G, s + n * G, zs + n * G, xg + m * G, y + m * N + n, N);
        for (; m < M; ++m)
            row_gemv<BITS, 1>(x + m * ldx, ldx, wr, kw, gs, G, s + n * G, zs + n * G, xg + m * G, y + m * N + n, N);
    }
}

typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));

template <int BITS>
static void dequant(const int32_t* w, int64_t N, int64_t kw, int64_t K, int64_t gs, int64_t G,
                    const float* s, const float* zs, void* out, int bf16, int nthreads) {
    constexpr int PF = 32 / BITS;
    constexpr int MASK = (1 << BITS) - 1;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; ++n) {
        const float* sn = s + n * G;
        const float* zn = zs + n * G;
        int64_t k = 0, g = 0, gend = gs;
        for (int64_t b = 0; b < kw && k < K; b += 16) {
            v16i wv;
            memcpy(&wv, w + n * kw + b, 64);
            for (int t = 0; t < PF && k < K; ++t, k += 16) {
                v16f d = __builtin_convertvector((wv >> (BITS * t)) & MASK, v16f) * sn[g] - zn[g];
                int64_t cnt = K - k < 16 ? K - k : 16;
                if (bf16) {  // round to nearest even
                    v16u u;
                    memcpy(&u, &d, 64);
                    v16h h = __builtin_convertvector((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16, v16h);
                    if (cnt == 16) memcpy((uint16_t*)out + n * K + k, &h, 32);  // constant size: inlined
                    else memcpy((uint16_t*)out + n * K + k, &h, cnt * 2);
                } else {
                    if (cnt == 16) memcpy((float*)out + n * K + k, &d, 64);
                    else memcpy((float*)out + n * K + k, &d, cnt * 4);
                }
                if (k + 16 == gend && g + 1 < G) { ++g; gend += gs; }
            }
        }
    }
}

extern "C" {
// Per-token 4-bit quantizer, the formulas of w4a4_ref (IEEE division, round half to even).
void loaq_act_quant(const float* x, int64_t M, int64_t K, int sym, int8_t* codes, float* scale,
                    int32_t* zero, int32_t* rowsum, int nthreads) {
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t m = 0; m < M; ++m) {
        const float* xr = x + m * K;
        float lo = 0.f, hi = 0.f, amax = 0.f;
        for (int64_t k = 0; k < K; ++k) {
            lo = xr[k] < lo ? xr[k] : lo;
            hi = xr[k] > hi ? xr[k] : hi;
        }
        amax = -lo > hi ? -lo : hi;
        float s = sym ? amax / 7.0f : (hi - lo) / 15.0f;
        if (s == 0.f) s = 1.f;
        float z = sym ? 0.f : nearbyintf(-lo / s);
        float qmin = sym ? -8.f : 0.f, qmax = sym ? 7.f : 15.f, shift = sym ? 0.f : 8.f;
        int32_t sum = 0;
        for (int64_t k = 0; k < K; ++k) {
            float q = nearbyintf(xr[k] / s) + z;
            q = q < qmin ? qmin : (q > qmax ? qmax : q);
            int8_t c = (int8_t)(q - shift);
            codes[m * K + k] = c;
            sum += c;
        }
        scale[m] = s;
        zero[m] = (int32_t)(z - shift);
        rowsum[m] = sum;
    }
}

// y [M, N] fp32 from x [M, K] (fp32, or bf16 if x_bf16; row stride ldx). The prologue
// copies x to fp32 zero-padded to the packed length and sums it per quantization group.
int loaq_gemv(const void* x, int x_bf16, int64_t M, int64_t K, int64_t ldx, const int32_t* w, int64_t N,
              int64_t kw, int bits, int64_t gs, int64_t G, const float* s, const float* zs, float* y,
              int nthreads) {
    int64_t kp = kw * (32 / bits);
    float* xp = (float*)calloc(M * kp + M * G, sizeof(float));
    if (!xp) return 2;
    float* xg = xp + M * kp;
    for (int64_t m = 0; m < M; ++m)
        for (int64_t k = 0; k < K; ++k) {
            float v;
            if (x_bf16) {
                uint32_t u = (uint32_t)((const uint16_t*)x)[m * ldx + k] << 16;
                memcpy(&v, &u, 4);
            } else {
                v = ((const float*)x)[m * ldx + k];
            }
            xp[m * kp + k] = v;
            xg[m * G + (k / gs < G ? k / gs : G - 1)] += v;
        }
    int rc = 0;
    switch (bits) {
        case 2: gemv<2>(xp, M, kp, w, N, kw, gs, G, s, zs, xg, y, nthreads); break;
        case 3: gemv<3>(xp, M, kp, w, N, kw, gs, G, s, zs, xg, y, nthreads); break;
        case 4: gemv<4>(xp, M, kp, w, N, kw, gs, G, s, zs, xg, y, nthreads); break;
        default: rc = 1;
    }
    free(xp);
    return rc;
}

int loaq_dequant(const int32_t* w, int64_t N, int64_t kw, int64_t K, int bits, int64_t gs, int64_t G,
                 const float* s, const float* zs, void* out, int bf16, int nthreads) {
    switch (bits) {
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
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.loaq_gemv.argtypes = [ptr, ctypes.c_int, i64, i64, i64, ptr, i64, i64, ctypes.c_int, i64, i64, ptr, ptr,
                              ptr, ctypes.c_int]
    lib.loaq_act_quant.argtypes = [ptr, i64, i64, ctypes.c_int, ptr, ptr, ptr, ptr, ctypes.c_int]
    lib.loaq_dequant.argtypes = [ptr, i64, i64, i64, ctypes.c_int, i64, i64, ptr, ptr, ptr, ctypes.c_int, ctypes.c_int]
    return lib


@dataclass(frozen=True)
class CpuWeight:
    """Kernel-ready CPU weight: ``packed`` in ``pack_lanes``, fp32 ``scales`` and ``zs = uz*scale``."""

    packed: torch.Tensor  # int32 [N, Kp / pf]
    scales: torch.Tensor  # fp32 [N, G]
    zs: torch.Tensor  # fp32 [N, G]
    bits: int
    n: int
    k: int
    group_size: int  # Kp when per-channel

    @property
    def kp(self) -> int:
        return self.packed.shape[1] * (32 // self.bits)


def prepare_cpu(w: PackedLinear) -> CpuWeight:
    """One-time repack of checkpoint tensors into the CPU layout."""
    n, k = w.shape
    g = w.weight_scale.shape[1]
    packed = pack_lanes(unpack_codes(w.weight_packed, w.bits, k), w.bits)
    scales = w.weight_scale.float().contiguous()
    uz = unpack_zero_points(w.weight_zero_point, w.bits, n, g).float()
    kp = packed.shape[1] * (32 // w.bits)
    group = w.group_size or kp
    assert group % 16 == 0, f"CPU kernels need group sizes that are multiples of 16, got {group}"
    return CpuWeight(packed, scales, (uz * scales).contiguous(), w.bits, n, k, group)


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
    _library().loaq_dequant(
        w.packed.data_ptr(), w.n, w.packed.shape[1], w.k, w.bits, w.group_size, w.scales.shape[1],
        w.scales.data_ptr(), w.zs.data_ptr(), out.data_ptr(), int(dtype == torch.bfloat16),
        torch.get_num_threads(),
    )
    return out


def _gemv(x: torch.Tensor, w: CpuWeight) -> torch.Tensor:
    """fp32 [M, N] from fp32 or bf16 activations [M, K] (fused unpack-and-FMA)."""
    if x.dtype not in (torch.float32, torch.bfloat16):
        x = x.float()
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty((x.shape[0], w.n), dtype=torch.float32)
    rc = _library().loaq_gemv(
        x.data_ptr(), int(x.dtype == torch.bfloat16), x.shape[0], w.k, x.stride(0), w.packed.data_ptr(), w.n, w.packed.shape[1], w.bits,
        w.group_size, w.scales.shape[1], w.scales.data_ptr(), w.zs.data_ptr(), y.data_ptr(),
        torch.get_num_threads(),
    )
    assert rc == 0, f"loaq_gemv failed with code {rc}"
    return y


def cpu_wna16_matmul(x: torch.Tensor, w: CpuWeight) -> torch.Tensor:
    """``x @ W.T`` for x [..., K] in bf16/fp32/fp16 on CPU; returns x.dtype."""
    assert x.shape[-1] == w.k, f"x has K={x.shape[-1]}, weight has K={w.k}"
    x2 = x.reshape(-1, w.k)
    if x2.shape[0] >= DEQUANT_MIN_M:
        dtype = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
        y = torch.nn.functional.linear(x2.to(dtype), _dequantize(w, dtype))
    else:
        y = _gemv(x2, w)
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
    """W4A4 on CPU: ``sx * ((a - za) @ ((b - zb) * sw).T)``, exact integer sums in fp32."""
    assert w.bits == 4 and w.scales.shape[1] == 1, "W4A4 needs 4-bit per-channel weights"
    xq = act.codes.float() - act.zero.float()[:, None]
    if xq.shape[0] >= DEQUANT_MIN_M:  # integers |xq| <= 16 are exact in bf16
        y = torch.nn.functional.linear(xq.bfloat16(), _dequantize(w, torch.bfloat16)).float()
    else:
        y = _gemv(xq, w)
    return (y * act.scale[:, None]).to(out_dtype)
