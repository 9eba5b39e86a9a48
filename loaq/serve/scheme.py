"""The compressed-tensors scheme for LoaQ exports, and vLLM's compressed-tensors config that routes to it.

:class:`LoaQCompressedTensorsConfig` is vLLM's ``CompressedTensorsConfig`` (registered under the same name
by :mod:`loaq.serve.plugin`) whose linear layers get :class:`LoaQLinearScheme` when the layer's config group
is ``pack-quantized`` integer weights of 2/3/4 bits, per channel or group, static, with either no input
activations (WNA16) or int4 per-token dynamic input activations (W4A4, sym or asym), or takes the online R4
Hadamard of the export's ``transform_config``, and :func:`loaq.serve.routing.route` gives it to LoaQ (every such
layer of a LoaQ export; of other checkpoints the ones stock vLLM has no correct kernel for). Stock vLLM 0.32 cannot run 2/3-bit on CPU, allocates
3-bit as a dense 3-bit stream (compressed-tensors packs 10 codes per int32), and runs asym W4A4 as W4A16; the
scheme allocates the checkpoint's own shapes, quantizes activations as
:func:`loaq.kernels.w4a4_ref.quantize_activations_ref` and applies R4 as
:func:`loaq.kernels.hadamard_ref.hadamard_transform_ref`. Any other layer goes to vLLM's schemes unchanged.
A W4A4 group that no LoaQ kernel can run (e.g. grouped weights) is refused with one line, never run as W4A16.
A checkpoint saved by compressed-tensors 0.18-0.20 packs 3-bit codes as one dense bit stream
(:mod:`loaq.export.layouts`, told apart by ``quantization_config.version``): the scheme allocates that
layout's shapes and repacks it once after loading into the 10-per-word layout its kernels read; a version
whose packing is unknown is refused with one line. Under tensor parallelism each rank's weight loaders cut
its slice of the checkpoint tensors (:mod:`loaq.serve.shard`: output rows for column-parallel layers, input
words and groups for row-parallel ones) and a row-parallel layer's online R4 is its rank's diagonal block.
A linear that the checkpoint stores fused (Phi-3's ``qkv_proj`` and ``gate_up_proj``: one tensor set for all
of vLLM's shards, loaded with ``shard_id`` None) has its ``weight_shape`` and its zero points (packed along the
whole fused N) split into the per-shard layout on load (tensor parallel size 1 only).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy, QuantizationType
from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import MPLinearLayerConfig
from vllm.model_executor.layers.fused_moe import RoutedExperts
from vllm.model_executor.layers.linear import LinearBase
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
    CompressedTensorsConfig, CompressedTensorsLinearMethod)
from vllm.model_executor.layers.quantization.compressed_tensors.schemes import CompressedTensorsScheme
from vllm.model_executor.utils import set_weight_attrs
from vllm.platforms import current_platform

from loaq.export import layouts
from loaq.serve import routing, shard
from loaq.serve.kernels import WEIGHT_TYPES, LoaQCPULinearKernel, LoaQTritonLinearKernel

__all__ = ["LoaQCompressedTensorsConfig", "LoaQLinearScheme", "check_w4a4", "loaq_kind"]

_QKV = {"q": 0, "k": 1, "v": 2}


def loaq_kind(weights: QuantizationArgs | None, inputs: QuantizationArgs | None, fmt: str | None) -> str | None:
    """"wna16" or "w4a4" when a config group is one LoaQ runs, else None (vLLM's own schemes take it)."""
    if weights is None or fmt != CompressionFormat.pack_quantized.value:
        return None
    if weights.type != QuantizationType.INT or weights.dynamic or weights.num_bits not in (2, 3, 4):
        return None
    if weights.strategy not in (QuantizationStrategy.CHANNEL.value, QuantizationStrategy.GROUP.value):
        return None
    if inputs is None:
        return "wna16"
    if (inputs.type == QuantizationType.INT and inputs.num_bits == 4 and inputs.dynamic
            and inputs.strategy == QuantizationStrategy.TOKEN.value):
        return "w4a4"
    return None


def check_w4a4(prefix: str, kind: str | None, weights: QuantizationArgs, inputs: QuantizationArgs) -> None:
    """Refuse in one line a group with int4 input activations that no LoaQ W4A4 kernel runs (``kind`` of
    :func:`loaq_kind`): 4-bit per-channel weights and per-token dynamic int4 activations only."""
    if kind == "w4a4" and weights.num_bits == 4 and weights.strategy == QuantizationStrategy.CHANNEL.value:
        return
    raise ValueError(f"{prefix}: W4A4 with {weights.num_bits}-bit {weights.strategy} weights and "
                     f"{inputs.strategy} activations has no LoaQ kernel (4-bit per-channel weights, "
                     "per-token dynamic int4 activations only); re-export with those")


def _rows_loader(rows: list[int], what: str, select: Callable | None = None, fused: Callable | None = None) -> Callable:
    """Weight loader for a parameter whose fused shards are stacked along dim 0 (``rows[i]`` rows each);
    ``select(tensor, i)`` cuts this rank's slice of fused shard ``i`` from the checkpoint tensor (:mod:`loaq.serve.shard`).
    ``fused`` converts a checkpoint tensor that holds every shard at once (``shard_id`` None on a layer of
    several shards: Phi-3's ``qkv_proj``, ``gate_up_proj``) into that per-shard layout."""
    offsets = [0, *itertools.accumulate(rows)]

    def load(param: torch.nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None) -> None:
        if shard_id is None:
            i, dst = 0, param.data
            if fused is not None and len(rows) > 1:
                loaded = fused(loaded)
        else:
            i = _QKV[shard_id] if isinstance(shard_id, str) else int(shard_id)
            dst = param.data.narrow(0, offsets[i], rows[i])
        full = tuple(loaded.shape)
        if select is not None:
            try:
                loaded = select(loaded, i)
            except (RuntimeError, IndexError):
                loaded = None
        if loaded is not None:
            loaded = loaded.reshape(dst.shape) if loaded.numel() == dst.numel() else loaded
        if loaded is None or tuple(loaded.shape) != tuple(dst.shape):
            raise ValueError(f"{what}: checkpoint tensor has shape {full}, expected {tuple(dst.shape)} on this rank "
                             f"(shard {shard_id}, before tensor-parallel slicing if any); was it written by loaq-export?")
        dst.copy_(loaded)

    return load




def platform() -> str:
    """``"cpu"`` or ``"cuda"``: the platform column of :func:`loaq.serve.routing.route`."""
    return "cpu" if current_platform.is_cpu() else "cuda"


def kernel_class() -> type:
    """The LoaQ kernel class for this platform: C++/OpenMP on CPU, Triton on CUDA."""
    return LoaQCPULinearKernel if current_platform.is_cpu() else LoaQTritonLinearKernel


class LoaQLinearScheme(CompressedTensorsScheme):
    """Weights in the checkpoint's own shapes; one LoaQ kernel (CPU or Triton) per (fused) linear."""

    def __init__(self, weights: QuantizationArgs, act_sym: bool | None, had_k: torch.Tensor | None | bool,
                 layer_name: str | None = None, layout: str = layouts.WORDS):
        self.layout = layout  # the checkpoint's bit layout; the kernels read layouts.WORDS
        self.bits = weights.num_bits
        self.symmetric = bool(weights.symmetric)
        self.group_size = weights.group_size if weights.strategy == QuantizationStrategy.GROUP.value else None
        self.act_bits = 16 if act_sym is None else 4
        self.act_sym = True if act_sym is None else act_sym
        self.hadamard = had_k is not False
        self.had_k = had_k if isinstance(had_k, torch.Tensor) else None
        self.layer_name = layer_name

    @classmethod
    def get_min_capability(cls) -> int:
        return -1 if current_platform.is_cpu() else 75

    def create_weights(self, layer: torch.nn.Module, output_size: int, input_size: int,
                       output_partition_sizes: list[int], input_size_per_partition: int,
                       params_dtype: torch.dtype, weight_loader: Callable, **kwargs) -> None:
        from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear

        parts = list(output_partition_sizes)
        n, k = sum(parts), input_size_per_partition
        g = 1 if self.group_size is None else math.ceil(k / self.group_size)
        layer.input_size_per_partition, layer.output_size_per_partition = k, n
        layer.output_partition_sizes = parts
        self.parts = parts
        # tensor parallel (loaq.serve.shard): a row-parallel rank holds inputs [k0, k0 + k), a column-parallel
        # one rows [starts[i], starts[i] + parts[i]) of fused shard i (k/v heads replicated over some ranks)
        tp, rank = getattr(layer, "tp_size", 1), getattr(layer, "tp_rank", 0)
        row = isinstance(layer, RowParallelLinear) and tp > 1
        col = isinstance(layer, ColumnParallelLinear) and tp > 1
        if row:
            shard.check_row_split(self.layer_name, input_size, tp, self.group_size)
        reps = [1] * len(parts)
        if col and len(parts) == 3 and hasattr(layer, "num_kv_head_replicas"):
            reps = [1, layer.num_kv_head_replicas, layer.num_kv_head_replicas]
        full = [p * tp // r for p, r in zip(parts, reps)] if col else parts
        starts = [(rank // r) * p for p, r in zip(parts, reps)] if col else [0] * len(parts)
        k0 = rank * k if row else 0
        self.full_shapes = [(f, input_size if row else k) for f in full]
        bits, gs, lay = self.bits, self.group_size, self.layout

        def rows_of(t: torch.Tensor, i: int) -> torch.Tensor:
            if t.shape[0] != full[i]:
                raise IndexError
            return t.narrow(0, starts[i], parts[i]) if col else t

        def packed(t: torch.Tensor, i: int) -> torch.Tensor:
            t = rows_of(t, i)
            return shard.packed_slice(t, bits, input_size, k0, k, lay) if row else t

        def scales(t: torch.Tensor, i: int) -> torch.Tensor:
            t = rows_of(t, i)
            return shard.group_slice(t, gs, k0, k) if row else t

        def zeros(t: torch.Tensor, i: int) -> torch.Tensor:
            if col:
                t = shard.packed_slice(t, bits, full[i], starts[i], parts[i], lay, dim=0)
            return shard.group_slice(t, gs, k0, k) if row else t

        def add(name: str, shape: tuple[int, ...], dtype: torch.dtype, rows: list[int], select=None,
                fused=None) -> None:
            p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False)
            set_weight_attrs(p, {"weight_loader": _rows_loader(rows, f"{self.layer_name}.{name}", select, fused)})
            layer.register_parameter(name, p)

        sharded = row or col
        add("weight_packed", (n, layouts.packed_length(k, self.bits, self.layout)), torch.int32, parts,
            packed if sharded else None)
        add("weight_scale", (n, g), torch.float32, parts, scales if sharded else None)  # float32: bit-exact
        # (float16 checkpoint scales widen to float32 exactly in the loader's copy_)
        add("weight_shape", (len(parts), 2), torch.int64, [1] * len(parts),  # the checkpoint's full shapes
            fused=self._split_shape)
        if not self.symmetric:
            zrows = [layouts.packed_length(p, self.bits, self.layout) for p in parts]  # packed per shard
            add("weight_zero_point", (sum(zrows), g), torch.int32, zrows, zeros if sharded else None,
                self._split_zero_points)
        c = MPLinearLayerConfig(full_weight_shape=(input_size, output_size), partition_weight_shape=(k, n),
                                weight_type=WEIGHT_TYPES[(self.bits, self.symmetric)], act_type=params_dtype,
                                group_size=-1 if self.group_size is None else self.group_size,
                                zero_points=not self.symmetric)
        cls = kernel_class()
        ok, reason = cls.can_implement(c)
        if not ok:
            raise ValueError(f"{self.layer_name}: {reason}")
        self.kernel = cls(c, "weight_packed", "weight_scale", None if self.symmetric else "weight_zero_point")
        self.kernel.act_bits, self.kernel.act_sym = self.act_bits, self.act_sym
        self.kernel.hadamard = self.hadamard
        self.kernel.had_k = shard.local_had_k(self.layer_name, self.had_k, tp, rank) if row and self.hadamard \
            else self.had_k

    def _split_shape(self, shape: torch.Tensor) -> torch.Tensor:
        """A fused linear's ``weight_shape`` [N, K] as one (rows, K) row per shard."""
        if shape.numel() != 2 or int(shape.reshape(-1)[0]) != sum(self.parts):
            raise ValueError(f"{self.layer_name}: weight_shape {shape.tolist()} does not hold the fused shards "
                             f"{self.parts}; was it written by loaq-export?")
        return torch.tensor([[p, int(shape.reshape(-1)[1])] for p in self.parts], dtype=torch.int64)

    def _split_zero_points(self, z: torch.Tensor) -> torch.Tensor:
        """A fused linear's zero points, packed along its whole N, repacked shard by shard (the parameter's layout)."""
        codes = layouts.unpack(z, self.bits, sum(self.parts), self.layout, 0)
        return torch.cat([layouts.pack(c, self.bits, self.layout, 0) for c in codes.split(self.parts)])

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        k = layer.input_size_per_partition
        shapes = [tuple(r) for r in layer.weight_shape.data.tolist()]
        if shapes != self.full_shapes:
            raise ValueError(f"{self.layer_name}: weight_shape {shapes} does not match the model's {self.full_shapes}")
        words = layouts.WORDS
        if self.layout != words:
            packed = layouts.repack(layer.weight_packed.data, self.bits, k, self.layout, words)
            layer.weight_packed = torch.nn.Parameter(packed, requires_grad=False)
        if not self.symmetric and (len(self.parts) > 1 or self.layout != words):
            zs, row = [], 0  # one zero-point tensor packed along the fused N, in the kernels' layout
            for p in self.parts:
                rows = layouts.packed_length(p, self.bits, self.layout)
                zs.append(layouts.unpack(layer.weight_zero_point.data[row:row + rows], self.bits, p, self.layout, 0))
                row += rows
            layer.weight_zero_point = torch.nn.Parameter(layouts.pack(torch.cat(zs), self.bits, words, 0),
                                                         requires_grad=False)
        del layer.weight_shape
        self.kernel.process_weights_after_loading(layer)

    def apply_weights(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.kernel.apply_weights(layer, x, bias)


class LoaQCompressedTensorsConfig(CompressedTensorsConfig):
    """vLLM's compressed-tensors config; LoaQ's scheme for the layers stock vLLM cannot run correctly."""

    _r4: dict | None = None
    _mode: str | None = None

    def _online_r4(self) -> dict:
        """Module name -> had_k (None for a power-of-two order) of every layer taking the online R4."""
        if self._r4 is None:
            self._r4 = {}
            if self.transform_config is not None:
                from vllm.config import get_current_vllm_config

                from loaq.export.transform import online_hadamard

                self._r4 = online_hadamard(get_current_vllm_config().model_config.model)
        return self._r4

    def _loaq_scheme(self, layer: torch.nn.Module, prefix: str) -> LoaQLinearScheme | None:
        d = self.get_scheme_dict(layer, prefix)
        if not d:
            return None
        weights, inputs, fmt = d.get("weights"), d.get("input_activations"), d.get("format")
        if weights is None or weights.type != QuantizationType.INT:
            return None
        r4 = self._online_r4()
        had_k = r4[prefix] if prefix in r4 else False
        act4 = inputs is not None and getattr(inputs, "num_bits", None) == 4 and inputs.type == QuantizationType.INT
        kind = loaq_kind(weights, inputs, fmt)
        if kind is None and not act4:
            return None  # nothing LoaQ runs: vLLM's own scheme
        who = routing.route(routing.LayerKind(weights.num_bits, act4, had_k is not False), platform(),
                            routing.is_loaq_export(self.config), self.kernels_mode(), prefix)
        if who == routing.VLLM:
            return None
        if kind != "wna16":
            check_w4a4(prefix, kind, weights, inputs)
        layout = layouts.layout_of((self.config or {}).get("version"), [weights.num_bits])
        return LoaQLinearScheme(weights, None if kind == "wna16" else bool(inputs.symmetric), had_k, prefix, layout)

    def kernels_mode(self) -> str:
        """``LOAQ_VLLM_KERNELS`` as read once per config (:func:`loaq.serve.routing.kernels_mode`)."""
        if self._mode is None:
            self._mode = routing.kernels_mode()
        return self._mode

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, LinearBase):
            scheme = self._loaq_scheme(layer, prefix)
            if scheme is not None:
                layer.scheme = scheme
                return CompressedTensorsLinearMethod(self)
        if isinstance(layer, RoutedExperts):  # mixture-of-experts layers: loaq.serve.moe
            from loaq.serve.moe import loaq_moe_method

            method = loaq_moe_method(self, layer, prefix)
            if method is not None:
                return method
        return super().get_quant_method(layer, prefix)
