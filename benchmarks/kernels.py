"""Benchmark the quantized-linear kernels against the dense torch matmul of the same run.

    python -m benchmarks.kernels                 # CPU section (always available)
    python -m benchmarks.kernels --device cuda   # GPU section (needs a CUDA device)
    python -m benchmarks.kernels --device cuda --tune   # print a config sweep, write nothing

(from the repository root, as a module: it imports loaq from this checkout, and this file does not
shadow the ``kernels`` package transformers looks for, as it would with ``benchmarks/`` first on ``sys.path``).

For every kernel and shape: time, TFLOP/s (2·M·N·K / t), GB/s of weight traffic
(packed weight + scales + zero points, read once), and the speedup over the dense
baseline (fp16 ``F.linear`` on GPU, bf16 on CPU) measured in the same process.
The GPU section also measures device-to-device copy bandwidth (read + write bytes).
Results are merged by device into ``<out>/kernels.json`` and rendered to ``kernels.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from loaq.bench import command, cpu_model, load_average, utc_date
from loaq.kernels.layout import PackedLinear
from loaq.kernels.synthetic import random_linear

GPU_MS = [1, 4, 16, 64, 256, 2048]
GPU_SHAPES = [(4096, 4096), (8192, 8192), (14336, 4096), (4096, 14336)]
CPU_MS = [1, 16, 256]
# (N, K, group size): SmolLM2-135M's q/o, gate/up, down and k/v projections (its widths
# are not multiples of 128, vLLM's CPU kernel refuses g128 there), then 4096²
CPU_SHAPES = [(576, 576, 64), (1536, 576, 64), (576, 1536, 64), (192, 576, 64), (4096, 4096, 128)]
GROUP = 128


def weight_bytes(w: PackedLinear) -> int:
    zp = 0 if w.weight_zero_point is None else w.weight_zero_point.numel() * 4
    return w.weight_packed.numel() * 4 + w.weight_scale.numel() * w.weight_scale.element_size() + zp


def time_cpu(fn, batch_time: float = 0.002, batches: int = 30) -> float:
    """Seconds per call: the best of many short batches of calls.

    On a shared, busy host a batch that the scheduler preempts is slow; short batches
    (about 2 ms, a fraction of a scheduler slice) give many chances of an undisturbed one.
    """
    fn()
    t = time.perf_counter()
    fn()
    reps = max(1, int(batch_time / max(time.perf_counter() - t, 1e-6)))
    best = float("inf")
    for _ in range(batches):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t) / reps)
    return best


def time_gpu(fn) -> float:
    """Seconds per call, replayed in a CUDA graph (as vLLM decodes) to exclude launch cost."""
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=50) * 1e-3


def row(kernel: str, m: int, n: int, k: int, t: float, wbytes: int, t_dense: float) -> dict:
    return dict(kernel=kernel, M=m, N=n, K=k, time_us=t * 1e6, tflops=2 * m * n * k / t / 1e12,
                weight_gbs=wbytes / t / 1e9, speedup=t_dense / t)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


class VllmCpu:
    """vLLM's own CPU linear paths, driven as vLLM drives them after loading a checkpoint.

    * 4-bit: the compressed-tensors ``CompressedTensorsWNA16`` scheme creates the layer's
      parameters (which picks ``CPUWNA16LinearKernel`` on CPU), the checkpoint tensors are
      copied in, ``process_weights_after_loading`` repacks them, ``apply_weights`` runs
      ``cpu_gemm_wna16``.
    * bf16: ``dispatch_cpu_unquantized_gemm``, what ``UnquantizedLinearMethod`` calls on CPU
      (sgl-kernel prepacked GEMM on AMX CPUs for small weights, else a prepacked oneDNN matmul).
    """

    def __init__(self) -> None:
        import tempfile

        import vllm
        from vllm.config import VllmConfig, set_current_vllm_config
        from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment

        self.version = vllm.__version__
        self._config = set_current_vllm_config(VllmConfig())
        self._config.__enter__()
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"file://{tempfile.mktemp()}")
        ensure_model_parallel_initialized(1, 1)

    def wna16(self, w: PackedLinear):
        """``x -> y`` through vLLM's 4-bit CPU kernel on the checkpoint tensors of ``w``."""
        from vllm.model_executor.layers.quantization.compressed_tensors.schemes import CompressedTensorsWNA16

        n, k = w.shape
        scheme = CompressedTensorsWNA16("group" if w.group_size else "channel", w.bits, w.group_size,
                                        w.weight_zero_point is None, "bench")
        layer = torch.nn.Module()
        scheme.create_weights(layer, n, k, [n], k, torch.bfloat16, weight_loader=None)
        layer.weight_packed.data.copy_(w.weight_packed)
        layer.weight_scale.data.copy_(w.weight_scale)
        layer.weight_shape.data.copy_(torch.tensor([n, k]))
        if w.weight_zero_point is not None:
            layer.weight_zero_point.data.copy_(w.weight_zero_point)
        scheme.process_weights_after_loading(layer)
        self.wna16_kernel = f"{type(scheme.kernel).__name__} (isa {layer.isa_hint}, w4a8 {layer.use_w4a8})"
        return lambda x: scheme.apply_weights(layer, x, None)

    def bf16(self, dense: torch.Tensor):
        """``x -> y`` through vLLM's prepacked CPU GEMM for unquantized layers."""
        from vllm.model_executor.layers.utils import check_cpu_sgl_kernel, dispatch_cpu_unquantized_gemm

        layer = torch.nn.Module()
        layer.weight = torch.nn.Parameter(dense.clone(), requires_grad=False)
        layer.bias = None
        dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
        self.bf16_kernel = "sgl (weight_packed_linear)" if check_cpu_sgl_kernel(*dense.shape, dense.dtype) \
            else "oneDNN (onednn_mm, prepacked)"
        return lambda x: layer.cpu_linear(x, layer.weight, None)


def load_vllm() -> VllmCpu | None:
    try:
        return VllmCpu()
    except ImportError:
        print("vLLM is not importable: no vLLM baselines")
        return None


def bench_cpu() -> tuple[dict, list[dict]]:
    import torch.nn.functional as F

    from loaq.kernels.cpu import cpu_w4a4_linear, cpu_wna16_matmul, prepare_cpu
    from loaq.kernels.w4a4_ref import quantize_activations_ref, w4a4_matmul_ref
    from loaq.kernels.wna16_ref import wna16_matmul_ref

    vllm = load_vllm()
    rows = []
    for n, k, group in CPU_SHAPES:
        dense = torch.randn(n, k).bfloat16()
        layers = {b: random_linear(b, n, k, group, "cpu", torch.bfloat16) for b in (2, 3, 4)}
        prepared = {b: prepare_cpu(w) for b, w in layers.items()}
        w4pc = random_linear(4, n, k, None, "cpu", torch.bfloat16)
        w4a4 = prepare_cpu(w4pc)
        vllm_w4 = vllm.wna16(layers[4]) if vllm else None
        vllm_bf16 = vllm.bf16(dense) if vllm else None
        for m in CPU_MS:
            x = torch.randn(m, k).bfloat16()
            base = [("bf16 F.linear", lambda: F.linear(x, dense), dense.numel() * 2)]
            check(cpu_wna16_matmul(x, prepared[4]), wna16_matmul_ref(x.float(), layers[4]), "W4A16")
            check(cpu_w4a4_linear(x, w4a4, True), w4a4_matmul_ref(quantize_activations_ref(x, True), w4pc,
                                                                  torch.float32), "W4A4")
            if vllm:
                check(vllm_bf16(x), x.float() @ dense.float().t(), "vLLM bf16")
                check(vllm_w4(x), wna16_matmul_ref(x.float(), layers[4]), "vLLM W4A16")
                base.append(("vLLM bf16 " + vllm.bf16_kernel.split(" (")[0], lambda: vllm_bf16(x), dense.numel() * 2))
            times = {name: time_cpu(fn) for name, fn, _ in base}
            t_dense = min(times.values())
            shape_rows = [row(name, m, n, k, times[name], wb, t_dense) for name, _, wb in base]
            t_vllm4 = None
            if vllm:
                t_vllm4 = time_cpu(lambda: vllm_w4(x))
                shape_rows.append(row(f"vLLM W4A16 g{group}", m, n, k, t_vllm4, weight_bytes(layers[4]), t_dense))
            for b in (4, 3, 2):
                t = time_cpu(lambda: cpu_wna16_matmul(x, prepared[b]))
                shape_rows.append(row(f"W{b}A16 g{group}", m, n, k, t, weight_bytes(layers[b]), t_dense))
            t = time_cpu(lambda: cpu_w4a4_linear(x, w4a4, True))
            shape_rows.append(row("W4A4 (quant+gemm)", m, n, k, t, weight_bytes(w4pc), t_dense))
            for r in shape_rows:
                r["group"] = group
                if t_vllm4:
                    r["vs_vllm_w4"] = t_vllm4 * 1e6 / r["time_us"]
                print_row(r)
            rows += shape_rows
    meta = dict(device_name=cpu_model(), threads=torch.get_num_threads(),
                baseline="the fastest bf16 GEMM of the same run (speedup column)",
                load_average_at_end=load_average(), torch=torch.__version__)
    if vllm:
        meta.update(vllm=vllm.version, vllm_wna16_kernel=vllm.wna16_kernel, vllm_bf16_kernel=vllm.bf16_kernel)
    return meta, rows


def check(y: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    """The baselines must compute the same product (bf16 output rounding: 2e-2 of max |y|)."""
    err = rel_err(y, ref)
    if err > 2e-2:
        raise AssertionError(f"{name} disagrees with the reference: max error {err:.2e} of max |y|")


def bench_cuda() -> tuple[dict, list[dict]]:
    import torch.nn.functional as F

    from loaq.kernels.hadamard import hadamard_quantize
    from loaq.kernels.w4a4 import prepare_w4a4, quantize_activations, w4a4_matmul
    from loaq.kernels.wna16 import prepare_wna16, wna16_matmul

    buf = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(buf)
    t_copy = time_gpu(lambda: dst.copy_(buf))
    copy_gbs = 2 * buf.numel() / t_copy / 1e9
    del buf, dst
    print(f"copy bandwidth: {copy_gbs:.0f} GB/s")
    rows = []
    for n, k in GPU_SHAPES:
        dense = torch.randn(n, k, device="cuda", dtype=torch.float16)
        layers = {b: random_linear(b, n, k, GROUP, "cuda") for b in (2, 3, 4)}
        prepared = {b: prepare_wna16(w) for b, w in layers.items()}
        w4pc = random_linear(4, n, k, None, "cuda")
        w4a4 = prepare_w4a4(w4pc)
        had_k = (torch.randint(0, 2, (28, 28), device="cuda") * 2 - 1).float() if k == 14336 else None
        for m in GPU_MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            t_dense = time_gpu(lambda: F.linear(x, dense))
            rows.append(row("fp16 F.linear", m, n, k, t_dense, dense.numel() * 2, t_dense))
            for b in (4, 3, 2):
                t = time_gpu(lambda: wna16_matmul(x, prepared[b]))
                rows.append(row(f"W{b}A16 g{GROUP}", m, n, k, t, weight_bytes(layers[b]), t_dense))
            act = quantize_activations(x, True)
            t = time_gpu(lambda: w4a4_matmul(act, w4a4, x.dtype))
            rows.append(row("W4A4 gemm", m, n, k, t, weight_bytes(w4pc), t_dense))
            t = time_gpu(lambda: w4a4_matmul(quantize_activations(x, True), w4a4, x.dtype))
            rows.append(row("W4A4 quant+gemm", m, n, k, t, weight_bytes(w4pc), t_dense))
            t = time_gpu(lambda: w4a4_matmul(hadamard_quantize(x, had_k, True), w4a4, x.dtype))
            rows.append(row("W4A4 had+quant+gemm", m, n, k, t, weight_bytes(w4pc), t_dense))
            for r in rows[-7:]:
                print_row(r, copy_gbs)
        del dense, layers, prepared
    meta = dict(device_name=torch.cuda.get_device_name(), copy_gbs=copy_gbs, baseline="fp16 F.linear",
                torch=torch.__version__)
    return meta, rows


def tune_cuda() -> dict:
    """Time candidate configs on the 8192² goal shape; install and return the fastest."""
    import torch.nn.functional as F

    from loaq.kernels import w4a4 as w4a4_module
    from loaq.kernels import wna16 as wna16_module
    from loaq.kernels.w4a4 import prepare_w4a4, quantize_activations, w4a4_matmul
    from loaq.kernels.wna16 import prepare_wna16, wna16_matmul

    n = k = 8192

    def show(label, fn):
        try:
            t = time_gpu(fn)
            print(f"tune {label} {t * 1e6:.1f} us", flush=True)
            return t
        except Exception as e:  # noqa: BLE001 - a config may not fit in shared memory
            print(f"tune {label} failed: {type(e).__name__}", flush=True)
            return float("inf")

    dense = torch.randn(n, k, device="cuda", dtype=torch.float16)
    for m in (1, 16, 2048):
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        show(f"fp16 M={m}", lambda: F.linear(x, dense))
    tiles = [dict(BLOCK_N=bn, num_warps=w, num_stages=st, programs_per_sm=ps)
             for bn, w, st, ps in ((64, 2, 3, 4), (64, 2, 4, 4), (64, 2, 2, 4), (64, 2, 3, 8), (32, 1, 3, 8),
                                   (32, 2, 3, 8), (128, 4, 3, 4), (128, 2, 3, 4), (64, 1, 3, 8), (64, 4, 4, 8))]
    total = [0.0] * len(tiles)
    weights = {b: prepare_wna16(random_linear(b, n, k, GROUP, "cuda")) for b in (4, 2)}
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    for i, tile in enumerate(tiles):
        wna16_module.GEMV_TILE = tile
        for b, p in weights.items():
            total[i] += show(f"W{b} M=1 {tile}", lambda: wna16_matmul(x, p))
    wna16_module.GEMV_TILE = tiles[total.index(min(total))]
    x4 = torch.randn(4, k, device="cuda", dtype=torch.float16)
    t_dot = show("W4 M=4 dot", lambda: wna16_matmul(x4, weights[4]))
    wna16_module.GEMV_MAX_M = 4
    t_gemv = show("W4 M=4 gemv", lambda: wna16_matmul(x4, weights[4]))
    wna16_module.GEMV_MAX_M = 4 if t_gemv < t_dot else 2
    p = prepare_w4a4(random_linear(4, n, k, None, "cuda"))
    x = torch.randn(2048, k, device="cuda", dtype=torch.float16)
    act = quantize_activations(x, True)
    times = []
    for bm, bn, bk, w, s, i8 in ((128, 256, 128, 8, 3, True), (256, 128, 128, 8, 3, True)):
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, B_INT8=i8, num_warps=w, num_stages=s)
        times.append((show(f"W4A4 M=2048 {cfg}", lambda: w4a4_matmul(act, p, x.dtype, cfg)), cfg))
    w4a4_module.PREFILL_CONFIG = min(times, key=lambda tc: tc[0])[1]
    chosen = dict(wna16_GEMV_TILE=wna16_module.GEMV_TILE, wna16_GEMV_MAX_M=wna16_module.GEMV_MAX_M,
                  w4a4_PREFILL_CONFIG=w4a4_module.PREFILL_CONFIG)
    print("chosen", chosen, flush=True)
    return chosen


def print_row(r: dict, copy_gbs: float | None = None) -> None:
    pct = f" {100 * r['weight_gbs'] / copy_gbs:5.1f}%copy" if copy_gbs else ""
    print(f"{r['kernel']:22s} M={r['M']:5d} N={r['N']:6d} K={r['K']:6d} {r['time_us']:10.1f} us "
          f"{r['tflops']:8.2f} TFLOP/s {r['weight_gbs']:8.1f} GB/s{pct} x{r['speedup']:.2f}"
          + (f" x{r['vs_vllm_w4']:.2f} vs vLLM W4" if "vs_vllm_w4" in r else ""), flush=True)


def summary(results: dict) -> list[str]:
    """The goal figures: GPU 8192² at M=1 and M=2048, CPU M=1 (worst shape per kernel)."""
    lines = ["## Summary", ""]
    cuda = results.get("cuda")
    if cuda:
        copy = cuda["meta"]["copy_gbs"]
        for m in (1, 2048):
            parts = [f"{r['kernel']} x{r['speedup']:.2f}" + (f" ({100 * r['weight_gbs'] / copy:.0f}% of copy BW)"
                                                          if m == 1 else "")
                     for r in cuda["rows"] if r["M"] == m and r["N"] == r["K"] == 8192 and "fp16" not in r["kernel"]]
            lines.append(f"- GPU 8192², M={m}, vs fp16: " + "; ".join(parts))
    cpu = results.get("cpu")
    if cpu:
        lines += cpu_summary(cpu["rows"])
    return lines + [""]


def cpu_summary(rows: list[dict]) -> list[str]:
    """CPU, M=1, per shape: each low-bit kernel's speedup over the fastest bf16 GEMM of the
    run and (4-bit and below) over vLLM's 4-bit CPU kernel on the same shape."""
    ones = [r for r in rows if r["M"] == 1]
    kernels = [k for k in dict.fromkeys(r["kernel"].split(" g")[0] for r in ones)
               if "bf16" not in k and "vLLM" not in k]
    has_vllm = any("vs_vllm_w4" in r for r in ones)
    lines = ["", "CPU, M=1: time (us) of the fastest bf16 GEMM, and each kernel's speedup "
             + ("over it / over vLLM's W4A16 CPU kernel (>1: ours is faster)" if has_vllm else "over it"), "",
             "| N×K | fastest bf16 | " + " | ".join(kernels) + " |", "|---|---|" + "---:|" * len(kernels)]
    for n, k in dict.fromkeys((r["N"], r["K"]) for r in ones):
        shape = [r for r in ones if (r["N"], r["K"]) == (n, k)]
        best = min((r for r in shape if "bf16" in r["kernel"]), key=lambda r: r["time_us"])
        cells = []
        for name in kernels:
            r = next(r for r in shape if r["kernel"].split(" g")[0] == name)
            cells.append(f"x{r['speedup']:.2f}" + (f" / x{r['vs_vllm_w4']:.2f}" if "vs_vllm_w4" in r else ""))
        lines.append(f"| {n}×{k} | {best['kernel']} {best['time_us']:.1f} | " + " | ".join(cells) + " |")
    return lines


def render(results: dict) -> str:
    lines = ["# Kernel benchmarks", "", "Generated by `benchmarks/kernels.py`; speedup is against the "
             "dense baseline measured in the same run (CPU: the fastest bf16 GEMM of the run, torch's "
             "`F.linear` or vLLM's prepacked one). GB/s counts packed weight + scales once. "
             "CPU runs use `--threads 1`: the 2-core host is shared with other jobs (its load average is in "
             "the section below), and OpenMP barriers across a preempted core cost a scheduler tick (~8 ms) "
             "per call (a `--threads 2` run at load average 14-18 measured e.g. 3990 us for a 19 us GEMM); "
             "each time is the best of 30 batches of ~2 ms.", ""]
    lines += summary(results)
    for device, sec in sorted(results.items()):
        meta = sec["meta"]
        lines += [f"## {device}: {meta['device_name']}", "",
                  f"- command: `{sec['command']}`", f"- date: {sec['date']}", f"- host: {sec['host']}"]
        lines += [f"- {key}: {val:.0f}" if isinstance(val, float) else f"- {key}: {val}"
                  for key, val in meta.items() if key != "device_name"]
        copy = meta.get("copy_gbs")
        vs4 = any("vs_vllm_w4" in r for r in sec["rows"])
        lines += ["", "| kernel | M | N | K | time (us) | TFLOP/s | weight GB/s |"
                  + (" % copy BW |" if copy else "") + " speedup |" + (" vs vLLM W4A16 |" if vs4 else ""),
                  "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if copy else "") + "---:|" + ("---:|" if vs4 else "")]
        for r in sec["rows"]:
            pct = f" {100 * r['weight_gbs'] / copy:.0f} |" if copy else ""
            v4 = f" {r['vs_vllm_w4']:.2f} |" if "vs_vllm_w4" in r else (" |" if vs4 else "")
            lines.append(f"| {r['kernel']} | {r['M']} | {r['N']} | {r['K']} | {r['time_us']:.1f} | "
                         f"{r['tflops']:.2f} | {r['weight_gbs']:.1f} |{pct} {r['speedup']:.2f} |{v4}")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--tune", action="store_true",
                        help="GPU: sweep configs on 8192², use the fastest for the benchmark")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (torch and the C++ kernels); default: torch's default")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    chosen = tune_cuda() if args.tune else None
    meta, rows = bench_cuda() if args.device == "cuda" else bench_cpu()
    if chosen:
        meta["tuned_configs"] = json.dumps(chosen)
    section = dict(meta=meta, rows=rows, date=utc_date(), host=platform.node(), command=command())
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "kernels.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results[args.device] = section
    path.write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "kernels.md").write_text(render(results))
    print(f"wrote {path} and {args.out / 'kernels.md'}")


if __name__ == "__main__":
    main()
