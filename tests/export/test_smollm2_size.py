"""Exported SmolLM2 at 2/3/4 bits is as large as its bits, group size and unquantized parts imply (±5 %)."""

import copy
import math
import os

import pytest
import torch

from loaq.checkpoint import save_native
from loaq.config import Method, QuantConfig
from loaq.export.writer import export
from loaq.grids import GridSpec
from loaq.pipeline import quantize_model

VARIANTS = [GridSpec(2, 0, False), GridSpec(3, 0, False), GridSpec(4, 64, False), GridSpec(4, 64, True)]


def implied_bytes(model, results, spec: GridSpec, dtype_bytes: int = 2) -> int:
    """bits/8 per weight + a float32 scale (and a b-bit zero point if asymmetric) per group, the other
    tensors at ``dtype_bytes`` each (tied embeddings once)."""
    quantized = {f"{n}.weight" for n in results}
    total, seen = 0, set()
    for k, p in model.state_dict().items():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        if k in quantized:
            n, kk = p.shape
            g = spec.n_groups(kk)
            total += n * kk * spec.bits / 8 + n * g * (4 + (0 if spec.symmetric else spec.bits / 8))
        else:
            total += p.numel() * dtype_bytes
    return int(total)


def dir_bytes(path) -> dict[str, int]:
    return {f: os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)}


def test_export_sizes_match_the_bits(smollm2, tmp_path):
    model, tok, arch = smollm2
    rows = []
    for spec in VARIANTS:
        m = copy.deepcopy(model)
        cfg = QuantConfig(spec=spec, method=Method("rtn"))
        results = quantize_model(m, arch, torch.zeros(1, 1, dtype=torch.long), cfg, progress=False)
        tag = f"{spec.bits}-{spec.group_size}-{spec.symmetric}"
        native, out = tmp_path / f"n{tag}", tmp_path / f"x{tag}"
        save_native(str(native), m, tok, results, {"config": cfg.to_dict(), "source_model": "SmolLM2-135M"}, False)
        export(str(native), str(out))
        files = dir_bytes(out)
        tensors = sum(v for f, v in files.items() if f.endswith(".safetensors"))
        other = sum(files.values()) - tensors
        want = implied_bytes(m, results, spec) + other
        got = sum(files.values())
        rows.append((spec, got, want, got / want - 1))
        del m
    bf16 = sum(p.numel() * 2 for p in {p.data_ptr(): p for p in model.state_dict().values()}.values())
    print(f"\n{'variant':<28} {'on disk MiB':>12} {'implied MiB':>12} {'diff':>7} {'vs bf16':>8}")
    for spec, got, want, rel in rows:
        print(f"{str(spec):<28} {got / 2**20:>12.2f} {want / 2**20:>12.2f} {rel:>+7.2%} {got / bf16:>8.3f}")
    for spec, got, want, rel in rows:
        assert abs(rel) <= 0.05, (spec, got, want)
    sizes = [got for _, got, _, _ in rows]
    assert sizes[0] < sizes[1] < sizes[2] < bf16  # fewer bits, smaller files
    assert math.isclose(sizes[3], sizes[2], rel_tol=0.02)  # symmetric only drops the small zero points
