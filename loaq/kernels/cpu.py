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

The C++ source is ``csrc/cpu_kernels.cpp`` (package data). It is built with
``g++ -O3 -march=native -fopenmp`` into :func:`loaq.cache.cache_dir` (``$LOAQ_CACHE``,
default ``~/.cache/loaq``), keyed by a hash of the source, flags and CPU model, so
the dot-product paths exist exactly where the CPU has the instructions
(``features()``); it links the OpenMP runtime that torch has already loaded. A
nonzero return code of the library raises ``RuntimeError`` naming the call. A prepared layer passes its pointers as one C struct (``CpuWeight.desc``):
at decode, Python overhead is a large part of a small layer's time.
Activations are bf16 or fp32 (fp16 is computed via fp32). W4A4 on CPU quantizes
activations in C++ (bit-identical to the reference quantizer); without VNNI it runs
the fp32 GEMV on the integer codes (products and sums of integers below 2**24 are
exact in fp32), and for large M an fp32 GEMM on them with the dequantized fp32 weight
(:func:`cpu_wna16_matmul` on the codes; a bf16 weight would put the result 0.4 % off the reference).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from loaq.cache import cache_dir
from loaq.kernels.layout import PackedLinear, pack_lanes, unpack_codes, unpack_zero_points
from loaq.kernels.w4a4_ref import ActQuant

__all__ = ["CpuWeight", "prepare_cpu", "cpu_wna16_matmul", "cpu_quantize_activations", "cpu_w4a4_matmul",
           "cpu_w4a4_linear", "features", "DEQUANT_MIN_M", "DEQUANT_MIN_M_DOT"]

DEQUANT_MIN_M = 8  # GEMV vs dequantize+oneDNN crossover at 4096², 1 thread (kernels.md)
# the dot-product GEMVs (8 tokens per decoded weight) stay ahead up to M = 16..32 on
# SmolLM2 shapes, and further on 4096² (weight traffic), 1 thread
DEQUANT_MIN_M_DOT = 32

_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]


_ERRORS = {1: "unsupported bit width", 2: "out of memory for its workspace",
           3: "the library was built without AVX512-VNNI"}  # the return codes of csrc/cpu_kernels.cpp


def _check(rc: int, call: str) -> None:
    """Raise for a nonzero return code of the C library (kept under ``python -O``, unlike assert)."""
    if rc != 0:
        raise RuntimeError(f"{call} failed: {_ERRORS.get(rc, 'unknown error')} (code {rc})")


@functools.cache
def _library() -> ctypes.CDLL:
    """Compile (once per source/flags/CPU) and load the kernel library."""
    source = resources.files("loaq.kernels").joinpath("csrc", "cpu_kernels.cpp").read_text()
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu += next((line for line in f if line.startswith("model name")), "")
    key = hashlib.sha256((source + " ".join(_FLAGS) + cpu).encode()).hexdigest()[:16]
    cache = Path(cache_dir())
    path = cache / f"loaq_cpu_kernels_{key}.so"
    if not path.exists():
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            src = Path(tmp) / "cpu_kernels.cpp"
            src.write_text(source)
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
        if not all(x.is_contiguous() and x.device.type == "cpu" for x in t):
            raise ValueError("CpuWeight tensors must be contiguous and on the CPU")
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
    if group % 32 != 0:
        raise ValueError(f"CPU kernels need group sizes that are multiples of 32, got {group}")
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
    _check(rc, "loaq_dequant")
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
    _check(rc, "loaq_gemv")
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
    if shape[-1] != w.k:
        raise ValueError(f"x has K={shape[-1]}, weight has K={w.k}")
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
    if w.bits != 4 or w.scales.shape[1] != 1:
        raise ValueError(f"W4A4 needs 4-bit per-channel weights, got {w.bits}-bit with {w.scales.shape[1]} groups")
    m = act.codes.shape[0]
    if _int_dot():
        y = torch.empty((m, w.n), dtype=torch.bfloat16 if out_dtype == torch.bfloat16 else torch.float32)
        rc = _library().loaq_w4a4_gemv(act.codes.data_ptr(), act.zero.data_ptr(), act.scale.data_ptr(), m,
                                       w.addr, y.data_ptr(), y.dtype == torch.bfloat16,
                                       torch.get_num_threads())
        _check(rc, "loaq_w4a4_gemv")
        return y.to(out_dtype)
    # the float32 WNA16 product on the integer codes (GEMV, or dequantize + GEMM from DEQUANT_MIN_M): a bfloat16
    # weight would round (q - z) * s to 8 bits, 0.4 % off the reference
    y = cpu_wna16_matmul(act.codes.float() - act.zero.float()[:, None], w)
    return (y * act.scale[:, None]).to(out_dtype)


def cpu_w4a4_linear(x: torch.Tensor, w: CpuWeight, sym: bool) -> torch.Tensor:
    """W4A4 ``x @ W.T`` for x [M, K]: per-token activation quantization, then the integer
    GEMM; returns x.dtype. On VNNI CPUs both steps run in one C call."""
    if x.dtype in _NATIVE and x.stride(-1) == 1 and _int_dot():
        y = torch.empty(x.shape[0], w.n, dtype=x.dtype)
        rc = _library().loaq_w4a4_linear(x.data_ptr(), x.dtype is torch.bfloat16, x.shape[0], x.stride(0), sym,
                                         w.addr, y.data_ptr(), x.dtype is torch.bfloat16, torch.get_num_threads())
        _check(rc, "loaq_w4a4_linear")
        return y
    return cpu_w4a4_matmul(cpu_quantize_activations(x, sym), w, x.dtype)
