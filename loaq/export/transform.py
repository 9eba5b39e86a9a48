"""The online Hadamard R4 of a rotated checkpoint as a compressed-tensors ``transform_config``.

The engine stores ``down_proj`` for a rotated input: ``y = R4(x) Wᵀ`` with
``R4(x) = x (had_k ⊗ H_{n/K})ᵀ / √n`` (:func:`loaq.kernels.hadamard_ref.hadamard_transform_ref`,
``H`` Sylvester in natural order, ``had_k`` a K×K Hadamard matrix or None for K = 1). The export writes
one transform group ``"R4"`` on the ``input`` of every ``down_proj`` (exact-name targets):

- ``had_k`` None (``n`` a power of two): ``type "hadamard"``: compressed-tensors' deterministic Sylvester
  matrix divided by √n, the same transform;
- any other ``had_k`` (e.g. a Paley order-12 matrix ⊗ H_128 for width 1536, or the seeded
  ``√K · Q`` orthogonal fallback of :func:`loaq.hadamard.factor`): the library's schema has no such
  transform, so it is written as ``type "loaq-kronecker-hadamard"`` and the exact float32 ``had_k``
  goes into ``config.json``'s top-level ``"loaq_transforms": {"R4": {...}}`` — a LoaQ extension, with
  ``"blocks"``: how many diagonal blocks ``had_k`` has (``--r4-blocks``: ``√N (I_N ⊗ had_k_b)``; a
  tensor-parallel size must divide it). Loaders that do not know it stop at the unknown type instead of computing something else;
  the LoaQ vLLM plugin and :func:`online_hadamard` apply it.
"""

from __future__ import annotations

import json
import os

import torch
from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme

from loaq.errors import LoaQError
from loaq.hadamard import blocks_of

GROUP = "R4"
EXTENSION_TYPE = "loaq-kronecker-hadamard"
EXTENSION_KEY = "loaq_transforms"
DEFINITION = "y = x @ (had_k ⊗ H_{n/K}).T / sqrt(n), H Sylvester in natural order, x the module input"


def r4_targets(arch, num_layers: int) -> list[str]:
    """Exact names of the linears that read the online R4 (``arch.online`` of every decoder layer)."""
    return [f"{arch.layers}.{i}.{arch.online}" for i in range(num_layers)]


def is_scaled_orthogonal(had_k: torch.Tensor) -> bool:
    """``had_k had_kᵀ = K I`` (float32 rounding aside): what makes the R4 above orthogonal."""
    k = had_k.shape[0]
    if had_k.ndim != 2 or had_k.shape != (k, k):
        return False
    had_k = had_k.double()
    return torch.allclose(had_k @ had_k.T, k * torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-4 * k)


def r4_config(targets: list[str], n: int, had_k: torch.Tensor | None) -> tuple[TransformConfig, dict | None]:
    """(``transform_config``, the ``loaq_transforms`` extension or None) of an online R4 of width ``n``."""
    k = 1 if had_k is None else had_k.shape[0]
    if n % k or (n // k) & (n // k - 1):
        raise LoaQError(f"online Hadamard of width {n} with a {k}x{k} factor is not K * 2**m; "
                        "the native checkpoint's rotation is inconsistent, re-run `loaq quantize --rotate hadamard`")
    if had_k is not None and not is_scaled_orthogonal(had_k):
        raise LoaQError("the native checkpoint's r4.had_k is not a Hadamard matrix (had_k had_kᵀ ≠ K I); "
                        "re-run `loaq quantize --rotate hadamard`")
    apply = [TransformArgs(targets=targets, location="input")]
    if had_k is None:
        return TransformConfig(config_groups={GROUP: TransformScheme(type="hadamard", apply=apply)}), None
    scheme = TransformScheme(type=EXTENSION_TYPE, apply=apply)
    ext = {GROUP: {"had_k": had_k.float().tolist(), "order": n, "blocks": blocks_of(had_k), "definition": DEFINITION}}
    return TransformConfig(config_groups={GROUP: scheme}), ext


def _had_k_of(scheme: TransformScheme, ext: dict | None, n: int, where: str) -> torch.Tensor | None:
    """The ``had_k`` a written R4 scheme stands for, on inputs of width ``n``."""
    if scheme.type == "hadamard" and scheme.head_dim is None and not n & (n - 1):
        return None
    if scheme.type != EXTENSION_TYPE:
        raise LoaQError(f"{where}: transform {scheme.type!r} (head_dim {scheme.head_dim}) on width {n} is not one "
                        f"LoaQ applies; expected 'hadamard' of a power-of-two width or {EXTENSION_TYPE!r}")
    if not ext or GROUP not in ext:
        raise LoaQError(f"{where}: transform {EXTENSION_TYPE!r} needs config.json's {EXTENSION_KEY}.{GROUP}.had_k; "
                        "re-export with `loaq-export`")
    had_k = torch.tensor(ext[GROUP]["had_k"], dtype=torch.float32)
    if not is_scaled_orthogonal(had_k):
        raise LoaQError(f"{where}: {EXTENSION_KEY}.{GROUP}.had_k is not a Hadamard matrix; re-export with `loaq-export`")
    blocks = ext[GROUP].get("blocks", 1)
    if not isinstance(blocks, int) or blocks < 1 or blocks_of(had_k) % blocks:
        raise LoaQError(f"{where}: {EXTENSION_KEY}.{GROUP}.blocks is {blocks!r} but had_k is block-diagonal in "
                        f"{blocks_of(had_k)} block(s); re-export with `loaq-export`")
    return had_k


def online_hadamard(model_dir: str) -> dict[str, torch.Tensor | None]:
    """Every module of an export that takes the online R4 on its input -> its ``had_k`` (None: power of two).

    Apply with ``hadamard_transform_ref(x, had_k)`` (or the kernels' ``hadamard=True, had_k=...``). An export
    without a ``transform_config`` returns ``{}``. R4 reads ``down_proj``'s input, ``intermediate_size`` wide.
    """
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise LoaQError(f"{model_dir!r} is not an export (no config.json); pass the directory `loaq-export` wrote")
    config = json.load(open(path))
    tc = (config.get("quantization_config") or {}).get("transform_config") or {}
    if not tc:
        return {}
    try:
        tc = TransformConfig.model_validate(tc)
    except ValueError as exc:
        raise LoaQError(f"{path}: transform_config does not parse: {str(exc).splitlines()[0]}") from None
    out = {}
    for name, scheme in tc.config_groups.items():
        if name != GROUP or len(scheme.apply) != 1 or scheme.apply[0].location != "input" or scheme.apply[0].inverse:
            raise LoaQError(f"{path}: transform group {name!r} is not LoaQ's online R4 (one non-inverse input transform)")
        had_k = _had_k_of(scheme, config.get(EXTENSION_KEY), config["intermediate_size"], path)
        out |= dict.fromkeys(scheme.apply[0].targets, had_k)
    return out
