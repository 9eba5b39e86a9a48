"""Tensor-parallel shard loaders (:mod:`loaq.serve.shard` inside ``LoaQLinearScheme``) against unsharded
references, without an engine: each rank's layer is built as vLLM builds it (a row- or column-parallel layer
with ``tp_size``/``tp_rank``), gets the whole checkpoint tensors through its weight loaders, and must compute
its slice of the unsharded layer (column: its output rows; row: its partial sum over its inputs, the ranks'
partial sums adding up to the whole). Codes, scales and zero points (packed along N) of 2/3/4-bit, 3-bit's
10-per-word rows cut off word boundaries, the dense 3-bit layout, W4A4 and the block-diagonal R4."""

import pytest
import torch
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear

from loaq.errors import LoaQError
from loaq.export import layouts
from loaq.hadamard import block_diagonal, blocks_of, factor
from loaq.kernels.hadamard_ref import hadamard_transform_ref
from loaq.serve import scheme as S
from loaq.serve import shard
from loaq.serve.kernels import LoaQCPULinearKernel
from tests.serve.checkpoints import fake_quant_activations
from tests.serve.test_kernels import weight_args


def checkpoint(bits, n, k, group, asym, layout, seed):
    """One linear's checkpoint tensors (``layout``) and its dense weight."""
    g = torch.Generator().manual_seed(seed)
    lo = -(1 << (bits - 1))
    q = torch.randint(lo, -lo, (n, k), generator=g, dtype=torch.int8)
    ng = 1 if group is None else -(-k // group)
    t = {"weight_packed": layouts.pack(q, bits, layout), "weight_scale": torch.rand(n, ng, generator=g) * 0.02 + 0.005,
         "weight_shape": torch.tensor([n, k])}
    if asym:
        t["weight_zero_point"] = layouts.pack(torch.randint(lo, -lo, (n, ng), generator=g, dtype=torch.int8), bits,
                                              layout, 0)
    return t, layouts.dequantize(t, bits, group, not asym, layout)


def rank_layer(cls, tp, rank, **attrs):
    """A vLLM parallel linear of rank ``rank`` of ``tp``, as far as create_weights reads it."""
    layer = cls.__new__(cls)
    torch.nn.Module.__init__(layer)
    layer.tp_size, layer.tp_rank, layer.bias = tp, rank, None
    for k, v in attrs.items():
        setattr(layer, k, v)
    return layer


def load(scheme, layer, shards, output_size, input_size, parts, k_local, monkeypatch):
    monkeypatch.setattr(S, "kernel_class", lambda: LoaQCPULinearKernel)
    scheme.create_weights(layer, output_size=output_size, input_size=input_size, output_partition_sizes=parts,
                          input_size_per_partition=k_local, params_dtype=torch.float32, weight_loader=None)
    for sid, tensors in shards:
        for name, t in tensors.items():
            p = getattr(layer, name)
            p.weight_loader(p, t.clone(), sid)
    scheme.process_weights_after_loading(layer)


ROW_CASES = [  # bits, group, asym, layout, act_sym (None: weight-only)
    (2, 32, True, layouts.WORDS, None), (3, None, True, layouts.WORDS, None), (3, 32, True, layouts.WORDS, None),
    (3, 32, False, layouts.DENSE, None), (4, 64, True, layouts.WORDS, None), (4, None, False, layouts.WORDS, True),
    (4, None, True, layouts.WORDS, False)]


@pytest.mark.parametrize("bits,group,asym,layout,act_sym", ROW_CASES)
@pytest.mark.parametrize("hadamard", [False, True], ids=["plain", "r4_blocks"])
def test_row_parallel_ranks_sum_to_the_whole_layer(bits, group, asym, layout, act_sym, hadamard, monkeypatch):
    n, k, tp = 48, 384, 2  # 192 inputs a rank: 3-bit rows cut mid-word (192 = 19 * 10 + 2)
    t, W = checkpoint(bits, n, k, group, asym, layout, seed=bits)
    had_k = block_diagonal(k, 2).had_k if hadamard else False  # 384 = 2 blocks of 12 * 16
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(3))
    xr = hadamard_transform_ref(x, had_k) if hadamard else x
    total = 0
    for rank in range(tp):
        layer = rank_layer(RowParallelLinear, tp, rank)
        scheme = S.LoaQLinearScheme(weight_args(bits, group, asym), act_sym, had_k, "m.down_proj", layout)
        load(scheme, layer, [(None, t)], n, k, [n], k // tp, monkeypatch)
        sl = slice(rank * k // tp, (rank + 1) * k // tp)
        x_local = xr[:, sl] if act_sym is None else fake_quant_activations(xr[:, sl], act_sym)  # per token per rank
        y = scheme.apply_weights(layer, x[:, sl], None)
        ref = x_local @ W[:, sl].T
        assert (y - ref).abs().max() < 1e-5 * ref.abs().max()
        total = total + y
    if act_sym is None:
        assert (total - xr @ W.T).abs().max() < 1e-5 * (xr @ W.T).abs().max()


@pytest.mark.parametrize("bits,group,asym,layout", [(2, 32, True, layouts.WORDS), (3, None, True, layouts.WORDS),
                                                    (3, 64, True, layouts.DENSE), (4, 64, False, layouts.WORDS)])
@pytest.mark.parametrize("kv_heads", [4, 1], ids=["kv_split", "kv_replicated"])
def test_column_parallel_qkv_ranks_give_their_rows(bits, group, asym, layout, kv_heads, monkeypatch):
    head, heads, k, tp = 10, 4, 128, 2  # 20 q rows a rank: zero points (10 or 16 a word) cut mid-word
    sizes = [heads * head, kv_heads * head, kv_heads * head]
    tensors = [checkpoint(bits, s, k, group, asym, layout, seed=i) for i, s in enumerate(sizes)]
    reps = max(1, tp // kv_heads)
    parts = [sizes[0] // tp] + [max(1, kv_heads // tp) * head] * 2
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(5))
    for rank in range(tp):
        layer = rank_layer(QKVParallelLinear, tp, rank, num_kv_head_replicas=reps)
        scheme = S.LoaQLinearScheme(weight_args(bits, group, asym), None, False, "m.qkv_proj", layout)
        load(scheme, layer, [(s, t) for s, (t, _) in zip("qkv", tensors)], sum(sizes), k, parts, k, monkeypatch)
        starts = [rank * parts[0]] + [(rank // reps) * parts[1]] * 2
        W = torch.cat([w[s:s + p] for (_, w), s, p in zip(tensors, starts, parts)])
        y = scheme.apply_weights(layer, x, None)
        assert (y - x @ W.T).abs().max() < 1e-5 * (x @ W.T).abs().max()


def test_column_parallel_gate_up_and_zero_point_words(monkeypatch):
    bits, n, k, tp = 4, 24, 64, 2  # 12 rows a rank: zero points cut inside their 8-per-word words
    tensors = [checkpoint(bits, n, k, None, True, layouts.WORDS, seed=i) for i in range(2)]
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(1))
    for rank in range(tp):
        layer = rank_layer(MergedColumnParallelLinear, tp, rank)
        scheme = S.LoaQLinearScheme(weight_args(bits, None, True), None, False, "m.gate_up_proj")
        load(scheme, layer, [(i, t) for i, (t, _) in enumerate(tensors)], 2 * n, k, [n // tp] * 2, k, monkeypatch)
        W = torch.cat([w[rank * n // tp:(rank + 1) * n // tp] for _, w in tensors])
        assert (scheme.apply_weights(layer, x, None) - x @ W.T).abs().max() < 1e-5


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("layout", [layouts.WORDS, layouts.DENSE])
@pytest.mark.parametrize("start,size", [(0, 40), (40, 40), (10, 30), (16, 16), (37, 43)])
def test_packed_slice_is_the_slice_of_the_codes(bits, layout, start, size):
    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (6, 80), generator=torch.Generator().manual_seed(bits))
    q = q.to(torch.int8)
    for dim, codes in ((1, q), (0, q.T.contiguous())):
        got = shard.packed_slice(layouts.pack(codes, bits, layout, dim), bits, 80, start, size, layout, dim)
        assert torch.equal(got, layouts.pack(codes.narrow(dim, start, size), bits, layout, dim))


def test_group_slice_and_the_refused_tp_sizes():
    s = torch.arange(12.0).reshape(2, 6)
    assert torch.equal(shard.group_slice(s, 32, 96, 96), s[:, 3:6])
    assert torch.equal(shard.group_slice(s[:, :1], None, 96, 96), s[:, :1])  # per channel: replicated
    assert shard.valid_tp_sizes(192, 32) == [1, 2, 3, 6]
    with pytest.raises(LoaQError, match=r"^m\.down_proj: 192 inputs in groups of 32 cannot be split over 4 .*"
                                        r"--tensor-parallel-size in \{1, 2, 3, 6\}$"):
        shard.check_row_split("m.down_proj", 192, 4, 32)


def test_r4_blocks_and_their_rank_factors():
    full = factor(1536).had_k
    two = block_diagonal(1536, 2)
    assert (blocks_of(full), blocks_of(two.had_k), two.K) == (1, 2, 24)
    x = torch.randn(4, 1536, generator=torch.Generator().manual_seed(0))
    y = hadamard_transform_ref(x, two.had_k)
    for rank in range(2):
        sl = slice(rank * 768, (rank + 1) * 768)
        assert torch.allclose(hadamard_transform_ref(x[:, sl], shard.local_had_k("d", two.had_k, 2, rank)), y[:, sl],
                              atol=1e-5)
    four = block_diagonal(128, 4).had_k  # 4 blocks of H_32: rank factors [[1]] (None) at TP 4
    assert shard.local_had_k("d", four, 4, 3) is None and shard.local_had_k("d", four, 2, 1).shape == (2, 2)
    with pytest.raises(LoaQError, match=r"R4 has 1 block\(s\).*--r4-blocks N, N a multiple of 2"):
        shard.local_had_k("d", full, 2, 0)
    with pytest.raises(LoaQError, match="R4 has 2 block"):
        shard.local_had_k("d", two.had_k, 4, 0)
    with pytest.raises(LoaQError, match="--r4-blocks 5 does not divide"):
        block_diagonal(1536, 5)


def test_server_binds_one_core_set_per_parallel_rank(monkeypatch):
    from loaq.serve import server

    assert server.parallel_ranks(["--tensor-parallel-size", "2", "--dtype", "float32"]) == 2
    assert server.parallel_ranks(["-tp=2", "--pipeline-parallel-size=2"]) == 4 and server.parallel_ranks(None) == 1
    monkeypatch.setattr(server.os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3, 5})
    assert server.cpu_thread_binding(2) == "0,1|2,3" and server.cpu_thread_binding(1) is None
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr(server, "_cuda", lambda: False)
    assert server.server_env(ranks=2)["VLLM_CPU_OMP_THREADS_BIND"] == "0,1|2,3"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in server.server_env(ranks=1)


@pytest.mark.parametrize("tp", [1, 2])
def test_float16_scales_load_as_their_exact_float32_values(tp, monkeypatch):
    """``--scale-dtype float16`` exports: the plugin's float32 ``weight_scale`` takes the F16 tensor exactly, so the
    layer computes the export's float32 dequantization (what the native model computes)."""
    n, k = 48, 256
    t, _ = checkpoint(2, n, k, 32, True, layouts.WORDS, seed=7)
    t["weight_scale"] = t["weight_scale"].half()
    W = layouts.dequantize(t, 2, 32, False, layouts.WORDS)
    x = torch.randn(4, k, generator=torch.Generator().manual_seed(2))
    total = 0
    for rank in range(tp):
        layer = rank_layer(RowParallelLinear, tp, rank)
        scheme = S.LoaQLinearScheme(weight_args(2, 32, True), None, False, "m.down_proj", layouts.WORDS)
        load(scheme, layer, [(None, t)], n, k, [n], k // tp, monkeypatch)
        sl = slice(rank * k // tp, (rank + 1) * k // tp)
        total = total + scheme.apply_weights(layer, x[:, sl], None)
    ref = x @ W.T
    assert (total - ref).abs().max() < 1e-5 * ref.abs().max()
    assert (x @ (W.half().float()).T - ref).abs().max() > 1e-5 * ref.abs().max()  # a rounded weight would show
