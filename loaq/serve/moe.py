"""The fused-MoE quant method for LoaQ's pack-quantized experts (vLLM 0.32's ``RoutedExperts``).

Stock vLLM 0.32 runs compressed-tensors MoE experts on CPU only through ``CPUExpertsInt4`` (4-bit, grouped,
with zero points); 2/3-bit experts and per-channel grids have no CPU path, and its non-Marlin WNA16 method
asserts grouped weights. :class:`LoaQMoEMethod` takes every ``pack-quantized`` 2/3/4-bit expert group LoaQ
exports (per channel or grouped, sym or asym), routed like linears by :func:`loaq.serve.routing.route`
(a stock 4-bit checkpoint, or any under ``LOAQ_VLLM_KERNELS=off``, stays with vLLM):

- ``create_weights`` allocates the checkpoint's own tensors per expert, ``w13_*`` (gate rows, then up rows)
  and ``w2_*`` (down), loaded by its own loader from vLLM's expert mapping
  (``experts.{e}.gate_proj.weight_packed`` → ``w13_weight_packed[e]``, shard ``w1``; ``up_proj`` → ``w3``;
  ``down_proj`` → ``w2``);
- ``process_weights_after_loading`` checks ``weight_shape``, repacks a dense-layout checkpoint once
  (:mod:`loaq.export.layouts`), stacks each expert's gate/up zero points along N, and prepares two LoaQ
  linears per expert (:func:`loaq.kernels.dispatch.prepare_linear`, the kernels of
  :func:`loaq.serve.scheme.kernel_class`);
- ``apply`` runs ``torch.ops.loaq.moe`` (:mod:`loaq.kernels.moe`) on the router's top-k choice.

W4A4 experts (a group with ``input_activations``: int4 per token, dynamic; 4-bit per-channel weights, else
refused with one line as for linears by :func:`loaq.serve.scheme.check_w4a4`) get the dense W4A4 kernels:
each expert's two linears are prepared with ``act_bits=4`` (on CPU ``CpuW4A4Kernel``: int4 per-token
quantization of the input by :func:`loaq.kernels.w4a4_ref.quantize_activations_ref`'s formula, then an exact
integer GEMM), so the hidden states routed to an expert are quantized per token before gate/up and
``silu(gate) · up`` before down, as :func:`loaq.actquant.fake_quantize` does in the reference; the router
(vLLM's gate, before this method) reads the unquantized hidden states, as in LoaQ's quantizer.
Activations other than SiLU are refused with one line; tensor parallel size 1 only.
"""

from __future__ import annotations

import math

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy
from vllm.model_executor.layers.fused_moe.config import FUSED_MOE_UNQUANTIZED_CONFIG
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase

from loaq.export import layouts
from loaq.kernels.dispatch import prepare_linear
from loaq.kernels.layout import PackedLinear
from loaq.kernels.moe import register_experts

__all__ = ["LoaQMoEMethod", "loaq_moe_method"]

_SHARD = {"w1": 0, "w3": 1}  # gate, up rows of w13


def loaq_moe_method(config, layer, prefix: str):
    """:class:`LoaQMoEMethod` for the experts ``layer`` at ``prefix`` when their group is one LoaQ runs, else None."""
    from loaq.serve.scheme import check_w4a4, loaq_kind

    dicts = [config.get_scheme_dict(layer, f"{prefix}.0.{p}")
             for p in (layer.ckpt_gate_proj_name, layer.ckpt_up_proj_name, layer.ckpt_down_proj_name)]
    if any(d != dicts[0] for d in dicts) or not dicts[0]:
        return None
    d = dicts[0]
    weights, inputs = d.get("weights"), d.get("input_activations")
    kind = loaq_kind(weights, inputs, d.get("format"))
    if kind is None:
        return None
    from loaq.serve import routing
    from loaq.serve.scheme import platform

    who = routing.route(routing.LayerKind(weights.num_bits, kind == "w4a4", False), platform(),
                        routing.is_loaq_export(config.config), config.kernels_mode(), prefix)
    if who == routing.VLLM:
        return None
    if kind == "w4a4":
        check_w4a4(prefix, kind, weights, inputs)
    layout = layouts.layout_of((config.config or {}).get("version"), [weights.num_bits])
    return LoaQMoEMethod(weights, layer.moe_config, prefix, layout, None if kind == "wna16" else bool(inputs.symmetric))


class LoaQMoEMethod(FusedMoEMethodBase):
    """Per-expert packed weights in the checkpoint's layout; two LoaQ linears per expert; ``loaq::moe`` forward.
    ``act_sym``: None for weight-only experts, else the symmetry of their int4 per-token input activations (W4A4)."""

    def __init__(self, weights: QuantizationArgs, moe, layer_name: str, layout: str = layouts.WORDS,
                 act_sym: bool | None = None):
        super().__init__(moe)
        self.bits = weights.num_bits
        self.symmetric = bool(weights.symmetric)
        self.group_size = weights.group_size if weights.strategy == QuantizationStrategy.GROUP.value else None
        self.layer_name, self.layout = layer_name, layout
        self.act_bits = 16 if act_sym is None else 4
        self.act_sym = True if act_sym is None else act_sym
        act = getattr(getattr(moe, "activation", None), "value", "silu")
        if act != "silu":
            raise ValueError(f"{layer_name}: LoaQ's fused-MoE path runs SiLU-gated experts, not {act}")

    def _groups(self, k: int) -> int:
        return 1 if self.group_size is None else math.ceil(k / self.group_size)

    def create_weights(self, layer, num_experts: int, hidden_size: int, intermediate_size_per_partition: int,
                       params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        from vllm.distributed import get_tensor_model_parallel_world_size, model_parallel_is_initialized

        if model_parallel_is_initialized() and get_tensor_model_parallel_world_size() > 1:
            raise ValueError(f"{self.layer_name}: LoaQ experts run with tensor parallel size 1; drop --tensor-parallel-size")
        E, d, inter = num_experts, hidden_size, intermediate_size_per_partition
        self.dims = (E, d, inter)
        plen = lambda n: layouts.packed_length(n, self.bits, self.layout)  # noqa: E731
        shapes = {
            "w13_weight_packed": ((E, 2 * inter, plen(d)), torch.int32),
            "w13_weight_scale": ((E, 2 * inter, self._groups(d)), torch.float32),
            "w13_weight_shape": ((E, 2, 2), torch.int64),
            "w2_weight_packed": ((E, d, plen(inter)), torch.int32),
            "w2_weight_scale": ((E, d, self._groups(inter)), torch.float32),
            "w2_weight_shape": ((E, 1, 2), torch.int64),
        }
        if not self.symmetric:  # packed along N, per shard
            shapes["w13_weight_zero_point"] = ((E, 2 * plen(inter), self._groups(d)), torch.int32)
            shapes["w2_weight_zero_point"] = ((E, plen(d), self._groups(inter)), torch.int32)
        for name, (shape, dtype) in shapes.items():
            p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False)
            p.weight_loader = self._loader(name)
            layer.register_parameter(name, p)

    def _loader(self, name: str):
        def load(param, loaded_weight: torch.Tensor, weight_name: str = "", shard_id: str = "w2",
                 expert_id: int = 0, return_success: bool = False):
            dst = param.data[expert_id]
            if shard_id in _SHARD:
                rows = dst.shape[0] // 2
                dst = dst.narrow(0, _SHARD[shard_id] * rows, rows)
            src = loaded_weight.reshape(dst.shape) if loaded_weight.numel() == dst.numel() else loaded_weight
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(f"{self.layer_name}.{name}[{expert_id}] ({shard_id}): checkpoint tensor has shape "
                                 f"{tuple(loaded_weight.shape)}, expected {tuple(dst.shape)}; was it written by loaq-export?")
            dst.copy_(src)
            return True if return_success else None

        return load

    def process_weights_after_loading(self, layer) -> None:
        from loaq.serve.scheme import kernel_class

        E, d, inter = self.dims
        got13 = [tuple(map(tuple, r)) for r in layer.w13_weight_shape.data.tolist()]
        got2 = [tuple(map(tuple, r)) for r in layer.w2_weight_shape.data.tolist()]
        if any(g != ((inter, d), (inter, d)) for g in got13) or any(g != ((d, inter),) for g in got2):
            raise ValueError(f"{self.layer_name}: expert weight_shape does not match the model's "
                             f"gate/up [{inter}, {d}] and down [{d}, {inter}]")
        kernels = kernel_class().loaq_kernels
        w13, w2 = [], []
        for e in range(E):
            for out, stem, (n, k), parts in ((w13, "w13", (2 * inter, d), 2), (w2, "w2", (d, inter), 1)):
                w = self._packed(layer, stem, e, n, k, parts)
                out.append(prepare_linear(w, w.weight_packed.device, self.act_bits, self.act_sym, kernels=kernels))
        layer.loaq_moe_handle = register_experts(w13, w2)
        for name in [n for n, _ in layer.named_parameters(recurse=False) if n.startswith(("w13_", "w2_"))]:
            delattr(layer, name)  # the kernels keep their own copies

    def _packed(self, layer, stem: str, e: int, n: int, k: int, parts: int) -> PackedLinear:
        """Expert ``e``'s ``stem`` linear [n, k] as the kernels read it (words layout, zero points packed along n)."""
        words = layouts.WORDS
        packed = getattr(layer, f"{stem}_weight_packed").data[e]
        if self.layout != words:
            packed = layouts.repack(packed, self.bits, k, self.layout, words)
        zp = None
        if not self.symmetric:
            z = getattr(layer, f"{stem}_weight_zero_point").data[e]
            rows = z.shape[0] // parts
            codes = [layouts.unpack(z[i * rows:(i + 1) * rows], self.bits, n // parts, self.layout, 0)
                     for i in range(parts)]
            zp = layouts.pack(torch.cat(codes), self.bits, words, 0)
        scale = getattr(layer, f"{stem}_weight_scale").data[e]
        return PackedLinear(packed.contiguous(), scale.contiguous(), zp, self.bits, (n, k), self.group_size)

    def get_fused_moe_quant_config(self, layer):
        return FUSED_MOE_UNQUANTIZED_CONFIG  # the kernels dequantize inside; vLLM's modular kernels are not used

    def apply(self, layer, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              shared_experts=None, shared_experts_input=None) -> torch.Tensor:
        return torch.ops.loaq.moe(x, topk_weights, topk_ids, layer.loaq_moe_handle)
